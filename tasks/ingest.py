"""Ingestion tasks: read the source (I/O, retried), validate, commit + version (atomic)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cdm.config import Params
from cdm.ingest import IngestionRejected, IngestResult, commit, owner_metadata, read_source, validate
from cdm.sources import SourceFile
from cdm.workspace import Workspace


@task(retries=3, retry_delay_seconds=[1, 4, 10], cache_policy=NO_CACHE,
      retry_condition_fn=lambda task, run, state: not isinstance(state.result(raise_on_failure=False), ValueError))
def read_owner_source(workspace: str, source: str, max_bytes: int) -> list[SourceFile]:
    return read_source(Workspace(workspace), source, max_bytes)


@task(cache_policy=NO_CACHE)
def validate_batch(workspace: str, owner: str, files: list[SourceFile], params: Params) -> dict:
    report = validate(Workspace(workspace), owner, files, params)
    if not report.ok:
        raise IngestionRejected(owner, report)
    return report.as_dict()


@task(cache_policy=NO_CACHE)
def commit_batch(workspace: str, owner: str, source: str, files: list[SourceFile], license: str | None) -> IngestResult:
    """Owner folder + manifest, `dvc add`, `dvc push`, git commit — all or nothing. Remembers the source for the
    owner's scheduled ingestion deployment."""
    ws = Workspace(workspace)
    delays = Params.load(ws.params_path).data.push_retry_delays
    result = commit(ws, owner, files, owner_metadata(files, license), retry_delays=delays)
    ws.update_owner_record(result.owner_key, source=source)
    return result
