"""Unlearning tasks: one Prefect task per step of `cdm.platform.forgetting.unlearn`, typed inputs and outputs.

Each task returns the step's recorded output when the step is already done (a rerun after a crash), else runs it
and records the output before returning. Steps that talk to remote stores retry on I/O failures.

Why the revocation record and not Prefect's result persistence with cache keys: the record must be readable by
`cdm status` and the evaluation without the Prefect API, survive a Prefect database that is reset or remote, and
it is itself a store the verification scans (Prefect's result storage would be one more copy to purge). The
tasks still pass their typed outputs to each other, so the Prefect UI shows the data flow step by step.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from cdm.platform.models import cleanup
from cdm.platform.forgetting import unlearn
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.revocations import (Forgetting, Live, Plan, Purged, Retrained, Revocation, Verification, load,
                                                record_step, run_step, save)
from tasks import retry_on_io


def _step(ctx: Context, request_id: str, name: str, run):
    return run_step(ctx.ws, request_id, name, run)


@task(cache_policy=NO_CACHE, task_run_name="plan")
def plan(ctx: Context, request_id: str) -> Plan:
    return _step(ctx, request_id, "plan", lambda rev: unlearn.plan(ctx, rev))


@task(cache_policy=NO_CACHE, task_run_name="go-live")
def go_live(ctx: Context, request_id: str, plan: Plan) -> Live:
    return _step(ctx, request_id, "go_live", lambda rev: unlearn.go_live(ctx, rev, plan))


@task(cache_policy=NO_CACHE, task_run_name="remove-ingestion-schedule", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_on_io)
def remove_schedule(owner_key: str) -> list[str]:
    """The owner's ingestion deployment (and with it its schedule and scheduled runs) leaves the Prefect API.
    Returns the full names removed."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from tasks.ingest import ingestion_deployment

    name = f"cdm-ingest/{ingestion_deployment(owner_key)}"
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return []
        client.delete_deployment(deployment.id)
    return [name]


@task(cache_policy=NO_CACHE, task_run_name="retrain")
def retrain(ctx: Context, request_id: str, plan: Plan, live: Live, progress: bool = False) -> Retrained:
    cleanup.sweep_dead_runs(ctx.client, ctx.backend, ctx.experiment_id)  # after a killed run
    return _step(ctx, request_id, "retrain", lambda rev: unlearn.retrain(ctx, rev, plan, live, progress))


@task(cache_policy=NO_CACHE, task_run_name="forgetting-check")
def forgetting_check(ctx: Context, request_id: str, plan: Plan, retrained: Retrained) -> Forgetting:
    return _step(ctx, request_id, "forgetting_check", lambda rev: unlearn.forgetting_check(ctx, rev, plan, retrained))


@task(cache_policy=NO_CACHE, task_run_name="purge", retries=2, retry_delay_seconds=[2, 8],
      retry_condition_fn=retry_on_io)
def purge(ctx: Context, request_id: str, plan: Plan, live: Live, retrained: Retrained) -> Purged:
    """The intent (every version, object and file to delete) is recorded before anything is deleted."""
    def run(rev: Revocation) -> Purged:
        intent = unlearn.purge_intent(ctx, rev, plan, live, retrained)
        rev = record_step(ctx.ws, rev, "purge_intent", intent)
        unlearn.fault_point("purge:after-intent")
        from prefect.runtime import flow_run

        db, _ = prefect_database(flow_run.get_id()) if ctx.stack is None else (None, None)
        return unlearn.purge(ctx, rev, intent, plan, db)

    return _step(ctx, request_id, "purge", run)


@task(cache_policy=NO_CACHE, task_run_name="verify", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_io)
def verify(ctx: Context, request_id: str, purged: Purged, needles) -> Verification:
    """A verification that finds anything is kept with the request (`failed_verifications`), the purge is reopened
    and the run fails (exit 1): the next run purges and verifies again; only an ok verification is recorded."""
    from cdm.platform.forgetting.verification import verify as verify_step

    rev = load(ctx.ws, request_id)
    if rev.verify is not None:
        return rev.verify
    from prefect.runtime import flow_run

    db, server = prefect_database(flow_run.get_id())
    result = verify_step(ctx, rev, purged, needles, db, server)
    if not result.ok:
        rev.failed_verifications.append(result.model_dump())
        rev.purge = None
        save(ctx.ws, rev)
        findings = result.scan.get("findings", [])[:3] or [result.mlflow, result.dvc]
        raise unlearn.VerificationFailed(f"verification found traces of {rev.owner_key}; the request stays open "
                                         f"and the next run purges again: {json.dumps(findings)}", code=1)
    record_step(ctx.ws, rev, "verify", result)
    return result


@task(cache_policy=NO_CACHE, task_run_name="reevaluate")
def reevaluate(ctx: Context, request_id: str, retrained: Retrained) -> dict:
    return _step(ctx, request_id, "reevaluate", lambda rev: unlearn.reevaluate(ctx, rev, retrained))


@task(cache_policy=NO_CACHE, task_run_name="certify")
def certify(ctx: Context, request_id: str, verification: Verification, evaluation: dict) -> dict:
    rev = load(ctx.ws, request_id)
    if rev.completed:
        return rev.certify
    return unlearn.complete(ctx, rev, unlearn.certify(ctx, rev)).certify


def prefect_database(flow_run_id: str | None = None) -> tuple[Path | None, str | None]:
    """The SQLite file behind the Prefect API this process uses, or the URL of an API whose database is not known
    here (the scan reports it unscanned: never silently skipped).

    Without PREFECT_API_URL the API is this process's own (ephemeral) server, which uses the database of this
    process's settings. With one, a server on this machine may use any file: a candidate (the database of this
    process's settings, the Prefect home's default) is taken only when it holds `flow_run_id` — the run now in
    progress, which the server has just written."""
    import os

    from prefect.settings import get_current_settings

    settings = get_current_settings()
    api = os.environ.get("PREFECT_API_URL") or (str(settings.api.url) if settings.api.url else None)
    url = settings.server.database.connection_url
    url = str(url.get_secret_value() if hasattr(url, "get_secret_value") else url)
    configured = Path(url.split(":///", 1)[1]) if url.startswith("sqlite") and ":///" in url else None
    if api is None:
        return (configured if configured is not None and configured.exists() else None), None
    if flow_run_id is not None:
        for candidate in [configured, Path(settings.home) / "prefect.db"]:
            if candidate is not None and _holds(candidate, flow_run_id):
                return candidate, None
    return None, api


def _holds(db: Path, flow_run_id: str) -> bool:
    """Whether the SQLite database (read-only) has the flow run `flow_run_id`."""
    import sqlite3
    import uuid

    if not db.is_file():
        return False
    u = uuid.UUID(flow_run_id)
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute("SELECT 1 FROM flow_run WHERE id IN (?, ?, ?) LIMIT 1",
                               (str(u), u.hex, u.bytes)).fetchone() is not None
        finally:
            con.close()
    except sqlite3.Error:  # not a Prefect database
        return False
