"""`cdm stack up` / `cdm stack down`: the workspace's production stack on this machine (cdm/platform/stack/services.py)."""

from __future__ import annotations

from flows.commands.common import _status


def stack_up(workspace: str, pool: str, s3_endpoint: str | None, progress: bool):
    from cdm.platform.stack.services import StackConfig, up
    from cdm.platform.workspace.paths import Workspace
    from flows.deployments import deploy_to_pool

    ws = Workspace(workspace).require()
    with _status("starting PostgreSQL, S3, MLflow, Prefect and a worker…", progress):
        stack = up(ws, StackConfig(work_pool=pool, s3_endpoint=s3_endpoint))
        deployed = deploy_to_pool(str(ws.root), stack)
    result = {**stack.public(), "deployments": deployed}
    text = "\n".join([f"MLflow tracking URI   {stack.mlflow_tracking_uri}",
                      f"Prefect API           {stack.prefect_api_url}",
                      f"S3 endpoint           {stack.s3_endpoint_url}   (artifacts: {stack.artifacts_destination})",
                      f"Work pool             {stack.work_pool}   ({len(deployed)} deployments)",
                      f"Every cdm command on {ws.root} now uses this stack; `cdm stack down` stops it."])
    return result, text


def stack_down(workspace: str):
    from cdm.platform.stack.services import down
    from cdm.platform.workspace.paths import Workspace

    ws = Workspace(workspace).require()
    result = down(ws)
    return result, ("stopped: " + ", ".join(result["stopped"])) if result["stopped"] else "nothing was running"
