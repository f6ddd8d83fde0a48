"""Helpers of the command modules: the workspace's `Context` and a progress spinner."""

from __future__ import annotations

import sys

from cdm.platform.errors import WorkspaceError


def _ctx(workspace: str):
    from cdm.platform.context import Context

    return Context.load(workspace)


def _class_ctx(workspace: str, command: str):
    """The context of a class workspace; a text workspace is refused in one line (exit 2) by the commands that do
    not handle captions yet, before anything changes."""
    ctx = _ctx(workspace)
    if ctx.params.data.conditioning == "text":
        raise WorkspaceError(f"`cdm {command}` does not handle text workspaces yet (ingest and pretrain do); "
                             "see README, Text workspaces")
    return ctx


def _status(text: str, show: bool):
    """A spinner on stderr saying what is happening (only on a terminal)."""
    import contextlib

    if not show or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text)

