"""Unlearning tasks: one Prefect task per step of a revocation (`cdm.platform.forgetting`: one module per step),
typed inputs and outputs.

Each task loads the request's record and calls its step's `run`, which returns the step's recorded output when the
step is already done (a rerun after a crash), else runs it and records the output before returning. Steps that
talk to remote stores retry on I/O failures.

Why the revocation record and not Prefect's result persistence with cache keys: the record must be readable by
`cdm status` and the evaluation without the Prefect API, survive a Prefect database that is reset or remote, and
it is itself a store the verification scans (Prefect's result storage would be one more copy to purge). The
tasks still pass their typed outputs to each other, so the Prefect UI shows the data flow step by step.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from cdm.platform.forgetting import certify as certify_step
from cdm.platform.forgetting import forgetting_check as forgetting_check_step
from cdm.platform.forgetting import go_live as go_live_step
from cdm.platform.forgetting import plan as plan_step
from cdm.platform.forgetting import purge as purge_step
from cdm.platform.forgetting import reevaluate as reevaluate_step
from cdm.platform.forgetting import retrain as retrain_step
from cdm.platform.forgetting import verification as verify_step
from cdm.platform.forgetting.record import Forgetting, Live, Plan, Purged, Retrained, Verification, load
from cdm.platform.workspace.context import Context
from tasks import retry_on_io


@task(cache_policy=NO_CACHE, task_run_name="plan")
def plan(ctx: Context, request_id: str) -> Plan:
    return plan_step.run(ctx, load(ctx.ws, request_id))


@task(cache_policy=NO_CACHE, task_run_name="go-live")
def go_live(ctx: Context, request_id: str, plan: Plan) -> Live:
    return go_live_step.run(ctx, load(ctx.ws, request_id), plan)


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
    return retrain_step.run(ctx, load(ctx.ws, request_id), plan, live, progress)


@task(cache_policy=NO_CACHE, task_run_name="forgetting-check")
def forgetting_check(ctx: Context, request_id: str, plan: Plan, retrained: Retrained) -> Forgetting:
    return forgetting_check_step.run(ctx, load(ctx.ws, request_id), plan, retrained)


@task(cache_policy=NO_CACHE, task_run_name="purge", retries=2, retry_delay_seconds=[2, 8],
      retry_condition_fn=retry_on_io)
def purge(ctx: Context, request_id: str, plan: Plan, live: Live, retrained: Retrained) -> Purged:
    """The intent (every version, object and file to delete) is recorded before anything is deleted."""
    rev = load(ctx.ws, request_id)
    db = None
    if rev.purge is None and ctx.stack is None:  # Prefect's log lines that name the owner go too
        from prefect.runtime import flow_run

        db, _ = prefect_database(flow_run.get_id())
    return purge_step.run(ctx, rev, plan, live, retrained, db)


@task(cache_policy=NO_CACHE, task_run_name="verify", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_io)
def verify(ctx: Context, request_id: str, purged: Purged, needles) -> Verification:
    """A verification that finds anything is kept with the request, the purge is reopened and the run fails
    (exit 1): the next run purges and verifies again; only an ok verification is recorded."""
    rev = load(ctx.ws, request_id)
    if rev.verify is not None:
        return rev.verify
    from prefect.runtime import flow_run

    db, server = prefect_database(flow_run.get_id())
    return verify_step.run(ctx, rev, purged, needles, db, server)


@task(cache_policy=NO_CACHE, task_run_name="reevaluate")
def reevaluate(ctx: Context, request_id: str, retrained: Retrained) -> dict:
    return reevaluate_step.run(ctx, load(ctx.ws, request_id), retrained)


@task(cache_policy=NO_CACHE, task_run_name="certify")
def certify(ctx: Context, request_id: str, verification: Verification, evaluation: dict) -> dict:
    return certify_step.run(ctx, load(ctx.ws, request_id))


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
