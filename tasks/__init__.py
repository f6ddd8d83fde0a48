"""Prefect tasks: one step or side effect each, typed inputs and outputs, retries only where I/O can recover."""

from __future__ import annotations


def retry_on_io(task, task_run, state) -> bool:
    """Retry condition: the network or a remote store failed (worth another try), not the request itself."""
    from cdm.platform.data.dvc import RemoteError
    from cdm.platform.workspace.errors import WorkspaceError

    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (OSError, RemoteError, ConnectionError, TimeoutError)) and not isinstance(exc, WorkspaceError)
