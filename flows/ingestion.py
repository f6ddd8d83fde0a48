"""Ingestion flow: one run per owner, by hand (`cdm ingest`) or scheduled per owner (flows/deployments.py).

The flow is parameterized by the owner key only: the raw id and the source live in the owner record, never in
Prefect's database.
"""

from __future__ import annotations

from prefect import flow

from cdm.platform.workspace import owner_records
from cdm.platform.workspace.context import Context
from flows import load_served
from cdm.platform.data.ingest import requested
from tasks.ingest import commit_batch, read_owner_source, validate_batch


@flow(name="cdm-ingest", flow_run_name="ingest-{owner_key}")
def ingest_owner(workspace: str, owner_key: str) -> dict:
    """Validate the owner's batch from their recorded source and commit it, or reject it and change nothing."""
    ctx = load_served(workspace)
    files = read_owner_source(ctx, owner_key)
    report = validate_batch(ctx, owner_key, files)
    result = commit_batch(ctx, owner_key, files).as_dict()
    result["docs"] = report["docs"]
    return result


def ingest(ctx: Context, owner: str, source: str, license: str | None = None, cron: str | None = None) -> dict:
    """Entry point (CLI, demo): record the request, run the flow, issue the owner's token at their first ingestion
    (outside Prefect). A refused or failed ingestion leaves the owner record as it was."""
    with requested(ctx, owner, source, license, cron) as key:
        result = ingest_owner(str(ctx.ws.root), key)
    result["owner"] = owner
    result["token"] = None
    rec = owner_records.record(ctx.ws, key)
    if rec.token_public_key is None and rec.token_sha256 is None:
        result["token"] = owner_records.issue_token(ctx.ws, key)
    return result
