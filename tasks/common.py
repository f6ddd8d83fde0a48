"""What every task needs: the workspace, its params, the MLflow client and experiment."""

from __future__ import annotations

from dataclasses import dataclass

from cdm.config import Params
from cdm.workspace import Workspace


@dataclass
class Context:
    ws: Workspace
    params: Params
    client: object
    experiment_id: str


def context(workspace: str) -> Context:
    from cdm import registry

    ws = Workspace(workspace).require()
    params = Params.load(ws.params_path)
    c = registry.client(ws.tracking_uri)
    return Context(ws, params, c, registry.experiment_id(c, ws.artifact_root))
