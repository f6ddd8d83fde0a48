"""Helpers of the command modules: the workspace's `Context` and a progress spinner."""

from __future__ import annotations

import sys


def _ctx(workspace: str):
    from cdm.platform.context import Context

    return Context.load(workspace)


def _status(text: str, show: bool):
    """A spinner on stderr saying what is happening (only on a terminal)."""
    import contextlib

    if not show or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text)


def preload(*modules: str) -> None:
    """Import `modules` on a daemon thread while the command goes on. A command's flow first waits seconds for
    Prefect's local API server to start (a subprocess, on the other core); the heavy imports the flow's tasks need
    (great-expectations alone takes ~3 s) then overlap that wait instead of following it. A module that fails to
    import here fails again, with its error, where it is used."""
    import importlib
    import threading

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - reported by the real import
                return

    threading.Thread(target=load, name="cdm-preload", daemon=True).start()
