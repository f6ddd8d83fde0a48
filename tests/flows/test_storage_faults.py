"""S3 faults during `dvc push`: the real S3 server (moto on loopback) behind a loopback HTTP proxy that can stop
answering mid-push or answer errors. Ingestion retries with backoff, then fails clearly with the workspace as it
was; the objects it pushed before the failure leave the remote once the remote answers again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cdm.platform.data import dvc
from cdm.platform.workspace.context import Context
from cdm.platform.create import init_workspace
from cdm.platform.workspace.paths import Workspace

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture()
def faulty(s3_server, s3, tmp_path, monkeypatch, faulty_proxy, small_params, digit_owners):
    """A workspace whose S3 (DVC remote, owner sources) is reached through the faulty proxy."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the workspace's endpoint (the proxy) applies
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own retries, kept short: ours are under test
    proxy = faulty_proxy(s3_server)
    bucket = f"dvc-faults-{tmp_path.name[-12:].lower().replace('_', '-')}"
    s3.create_bucket(Bucket=bucket)
    p = small_params()
    p.data.push_retry_delays = [0.5, 1.0]
    ws = init_workspace(tmp_path / "ws", remote=f"s3://{bucket}/store", endpoint_url=proxy.url, params=p)
    return Context.load(ws.root), proxy, digit_owners(tmp_path / "sources"), s3


def upload(s3, folder: Path, bucket: str, prefix: str) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(folder).as_posix()}", Body=f.read_bytes())


def owner_objects_on_remote(ws: Workspace, folder: Path, s3) -> set[str]:
    held = {dvc.md5_bytes(f.read_bytes()) for f in folder.rglob("*.png")}
    return held & set(dvc.list_objects(ws.root, s3_client=s3)["remote"])


@pytest.mark.slow  # ~2 minutes of dropped connections and timeouts: `make test-slow`
def test_s3_stopping_mid_push_fails_clearly_changes_nothing_and_is_cleaned_up_later(faulty, workspace_snapshot):
    from flows.ingestion import ingest

    ctx, proxy, sources, s3 = faulty
    ws, snapshot = ctx.ws, workspace_snapshot
    ingest(ctx, "alice", str(sources["alice"]))
    before = snapshot(ws, s3)
    proxy.drop_after_puts(5)  # the server dies after 5 more uploads
    with pytest.raises(dvc.RemoteError) as err:
        ingest(ctx, "bob", str(sources["bob"]))
    message = str(err.value)
    assert "after 3 attempts" in message and "rolled back" in message, message
    # The workspace is as it was; only the uploads before the failure sit on the remote, and a journal says so.
    after = snapshot(ws, s3)
    assert {k: after[k] for k in ("files", "head", "dvc")} == {k: before[k] for k in ("files", "head", "dvc")}
    assert 0 < len(owner_objects_on_remote(ws, sources["bob"], s3)) <= 5
    assert list(ws.staging_dir.glob("journal-*.json"))
    assert "bob" not in ws.owners()
    # The server answers again: the next ingestion finishes the cleanup first, then commits its own batch.
    proxy.heal()
    ingest(ctx, "carol", str(sources["carol"]))
    assert not owner_objects_on_remote(ws, sources["bob"], s3)
    assert not list(ws.staging_dir.glob("journal-*.json"))
    assert set(ws.owners()) == {"alice", "carol"}
    assert_remote_in_sync(ws)  # every object of the current data/ is on the remote


def test_s3_errors_are_retried_with_backoff_and_the_push_completes(faulty, caplog):
    import logging

    from flows.ingestion import ingest

    ctx, proxy, sources, s3 = faulty
    ws = ctx.ws

    class HealOnRetry(logging.Handler):  # the S3 outage ends while cdm waits to retry
        def emit(self, record):
            if "retrying" in record.getMessage():
                proxy.heal()

    proxy.errors(10**9)  # every request answered 503 until healed: DVC's push fails, ours retries
    handler = HealOnRetry()
    logging.getLogger("cdm.platform.data.dvc").addHandler(handler)
    try:
        with caplog.at_level("WARNING", logger="cdm.platform.data.dvc"):
            result = ingest(ctx, "bob", str(sources["bob"]))
    finally:
        logging.getLogger("cdm.platform.data.dvc").removeHandler(handler)
    assert result["total"] == 60 and proxy.errored > 0
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 1 and "attempt 1 of 3" in retries[0] and "in 0.5 s" in retries[0], retries
    assert len(owner_objects_on_remote(ws, sources["bob"], s3)) == 60
    assert_remote_in_sync(ws)


def assert_remote_in_sync(ws: Workspace) -> None:
    status = dvc.run(ws.root, "status", "--cloud")
    assert "in sync" in status or "up to date" in status, status


def test_unreadable_s3_object_and_missing_bucket_are_refused_naming_them(faulty, workspace_snapshot):
    from cdm.platform.data.ingest import IngestionRejected
    from cdm.platform.data.sources import SourceError
    from flows.ingestion import ingest

    ctx, proxy, sources, s3 = faulty
    ws = ctx.ws
    bucket = f"owners-{ws.root.parent.name[-12:].lower().replace('_', '-')}"
    s3.create_bucket(Bucket=bucket)
    upload(s3, sources["dave"], bucket, "dave")
    victim = sorted(p.relative_to(sources["dave"]).as_posix() for p in sources["dave"].rglob("*.png"))[3]
    proxy.denied = victim
    before = workspace_snapshot(ws, s3)
    with pytest.raises(IngestionRejected) as err:
        ingest(ctx, "dave", f"s3://{bucket}/dave")
    assert victim in str(err.value) and "unreadable object" in str(err.value), str(err.value)
    with pytest.raises(SourceError, match="bucket does not exist"):
        ingest(ctx, "dave", "s3://no-such-bucket/dave")
    assert workspace_snapshot(ws, s3) == before and "dave" not in ws.owners()


def test_an_s3_source_that_stops_answering_is_read_again_by_the_task_retry(faulty):
    """Bug: every boto error became SourceError(ValueError), which the task's retry condition excluded, so an S3
    hiccup longer than botocore's own retries failed the ingestion. Now a dropped connection is
    `SourceUnavailable` (an OSError) and the Prefect task retries it."""
    from flows.ingestion import ingest

    ctx, proxy, sources, s3 = faulty
    bucket = f"src-{ctx.ws.root.parent.name[-12:].lower().replace('_', '-')}"
    s3.create_bucket(Bucket=bucket)
    upload(s3, sources["dave"], bucket, "dave")
    proxy.drop_next(2)  # botocore gives up after 2 attempts (AWS_MAX_ATTEMPTS): the first task run fails
    result = ingest(ctx, "dave", f"s3://{bucket}/dave")
    assert result["total"] == 20 and proxy.dropped == 2
