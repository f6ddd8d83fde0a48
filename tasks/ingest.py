"""Ingestion tasks: read the source (I/O, retried), validate, commit + version (atomic)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cdm.platform.workspace import owner_records
from cdm.platform.workspace.context import Context
from cdm.platform.data.ingest import IngestionRejected, IngestResult, commit, owner_metadata, read_source, validate
from cdm.platform.data.sources import SourceFile
from tasks import retry_on_io


def ingestion_deployment(owner_key: str) -> str:
    """The name of the owner's scheduled ingestion deployment (of flow `cdm-ingest`)."""
    return f"ingest-{owner_key}"


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE, retry_condition_fn=retry_on_io)
def read_owner_source(ctx: Context, owner_key: str) -> list[SourceFile]:
    """The owner's source as recorded (a revoked owner is refused here, before anything is read)."""
    rec = owner_records.record(ctx.ws, owner_key)
    owner_records.require_consent(rec, owner_key)
    if rec is None or not rec.source:
        raise owner_records.WorkspaceError(f"owner {owner_key} has no recorded source")
    return read_source(ctx, rec.source)


@task(cache_policy=NO_CACHE)
def validate_batch(ctx: Context, owner_key: str, files: list[SourceFile]) -> dict:
    report = validate(ctx, owner_key, files)
    if not report.ok:
        raise IngestionRejected(owner_key, report)
    return report.as_dict()


@task(cache_policy=NO_CACHE)
def commit_batch(ctx: Context, owner_key: str, files: list[SourceFile]) -> IngestResult:
    """Owner folder + manifest, `dvc add`, `dvc push`, git commit — all or nothing. Not retried as a task: the push
    has its own backoff, and a failed commit is rolled back (a retry would only repeat the rollback's I/O)."""
    license = owner_records.record(ctx.ws, owner_key).license
    return commit(ctx, owner_key, files, owner_metadata(files, license))
