"""Unlearning tasks: one Prefect task per step of `cdm.platform.unlearn`, typed inputs and outputs.

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

from cdm.platform import cleanup, unlearn
from cdm.platform.context import Context
from cdm.platform.revocations import (Forgetting, Live, Plan, Purged, Retrained, Revocation, Verification, load,
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
        return unlearn.purge(ctx, rev, intent, plan)

    return _step(ctx, request_id, "purge", run)


@task(cache_policy=NO_CACHE, task_run_name="verify", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_io)
def verify(ctx: Context, request_id: str, purged: Purged, needles) -> Verification:
    """A verification that finds anything is kept with the request (`failed_verifications`), the purge is reopened
    and the run fails (exit 1): the next run purges and verifies again; only an ok verification is recorded."""
    from cdm.platform.verification import verify as verify_step

    rev = load(ctx.ws, request_id)
    if rev.verify is not None:
        return rev.verify
    db, server = prefect_database()
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


def prefect_database() -> tuple[Path | None, str | None]:
    """The SQLite file behind the Prefect API this process uses, or the URL of a server that is not one here."""
    import os

    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = str(settings.server.database.connection_url.get_secret_value()
              if hasattr(settings.server.database.connection_url, "get_secret_value")
              else settings.server.database.connection_url)
    api = os.environ.get("PREFECT_API_URL") or (str(settings.api.url) if settings.api.url else None)
    local = api is None or "127.0.0.1" in api or "localhost" in api
    if url.startswith("sqlite") and local:
        path = Path(url.split(":///", 1)[1])
        return (path if path.exists() else None), None
    return None, api
