

SERVED_WORKSPACES = "CDM_WORKSPACES"  # set by `cdm serve` and the stack's worker: the workspaces they serve


def load_served(workspace: str):
    """The `Context` of `workspace` for a flow run that a deployment may have started: a serving process or worker
    runs flows only for the workspaces it was started for (CDM_WORKSPACES, `os.pathsep`-separated), whatever an
    API client puts in the `workspace` parameter. Without CDM_WORKSPACES (a flow called by a `cdm` command in this
    process) the workspace is the command's own."""
    import os
    from pathlib import Path

    from cdm.platform.workspace.context import Context
    from cdm.platform.workspace.errors import WorkspaceError

    served = [Path(p).resolve() for p in os.environ.get(SERVED_WORKSPACES, "").split(os.pathsep) if p]
    if served and Path(workspace).resolve() not in served:
        raise WorkspaceError("this worker does not serve that workspace")
    ctx = Context.load(workspace)
    if served:
        redact_run_logs(ctx.ws)
    return ctx


def api_log_handlers() -> list:
    """Every handler that sends log records to Prefect's API (on its run loggers, and on any logger configured so):
    a filter there sees the records of child loggers too."""
    import logging

    from prefect.logging.handlers import APILogHandler

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    found = {id(h): h for lg in loggers for h in getattr(lg, "handlers", []) if isinstance(h, APILogHandler)}
    return list(found.values())


def redact_run_logs(ws) -> None:
    """In a serving process or worker (no `cdm` command around it): raw owner ids in log records become their keys
    before the records reach Prefect's API (once per workspace and process)."""
    from cdm.platform.workspace.owner_records import RedactOwnerIds

    for handler in api_log_handlers():
        if not any(isinstance(f, RedactOwnerIds) and f.ws.root == ws.root for f in handler.filters):
            handler.addFilter(RedactOwnerIds(ws))
