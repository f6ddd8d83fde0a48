"""Helpers of the command modules: the workspace's `Context` and a progress spinner."""

from __future__ import annotations

import sys



def _ctx(workspace: str):
    from cdm.platform.workspace.context import Context

    return Context.load(workspace)


def _status(text: str, show: bool):
    """A spinner on stderr saying what is happening (only on a terminal)."""
    import contextlib

    if not show or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text)

