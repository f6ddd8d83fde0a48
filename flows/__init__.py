

SERVED_WORKSPACES = "CDM_WORKSPACES"  # set by `cdm serve` and the stack's worker: the workspaces they serve


def load_served(workspace: str):
    """The `Context` of `workspace` for a flow run that a deployment may have started: a serving process or worker
    runs flows only for the workspaces it was started for (CDM_WORKSPACES, `os.pathsep`-separated), whatever an
    API client puts in the `workspace` parameter. Without CDM_WORKSPACES (a flow called by a `cdm` command in this
    process) the workspace is the command's own."""
    import os
    from pathlib import Path

    from cdm.platform.context import Context
    from cdm.platform.errors import WorkspaceError

    served = [Path(p).resolve() for p in os.environ.get(SERVED_WORKSPACES, "").split(os.pathsep) if p]
    if served and Path(workspace).resolve() not in served:
        raise WorkspaceError("this worker does not serve that workspace")
    return Context.load(workspace)
