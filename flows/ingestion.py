"""Ingestion flow: one run per owner (scheduled per owner by a deployment, see flows/deployments.py)."""

from __future__ import annotations

from prefect import flow

from cdm.config import Params
from cdm.workspace import Workspace, check_owner_id
from tasks.ingest import commit_batch, read_owner_source, validate_batch


@flow(name="cdm-ingest", flow_run_name="ingest-{owner}")
def ingest_owner(workspace: str, owner: str, source: str, license: str | None = None) -> dict:
    """Validate an owner's batch and commit it into the workspace, or reject it and change nothing."""
    check_owner_id(owner)
    ws = Workspace(workspace).require()
    params = Params.load(ws.params_path)
    files = read_owner_source(workspace, source, params.data.max_file_bytes)
    report = validate_batch(workspace, owner, files, params)
    result = commit_batch(workspace, owner, source, files, license).as_dict()
    result["docs"] = report["docs"]
    return result
