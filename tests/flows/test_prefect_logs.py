"""Prefect's own run logs are a store cdm writes: they reach Prefect's API with owner keys only, the purge deletes
what got there another way, and the verification scans the database the API really uses (test harness: a real
Prefect API on loopback with its own SQLite file)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from cdm.platform.forgetting import stores
from cdm.platform.workspace import owner_records
from cdm.platform.workspace.paths import Workspace

pytestmark = pytest.mark.usefixtures("prefect_harness")

RAW = "quentin"
MESSAGE = f"source /srv/{RAW}/photos is unreadable"  # what SourceError(str(e)) once carried


def run_logging_flow() -> str:
    """A flow run that logs MESSAGE through its run logger; returns its id once the log lines are in the API."""
    from prefect import flow, get_run_logger
    from prefect.logging.handlers import APILogHandler
    from prefect.runtime import flow_run

    @flow(name="cdm-test-logs")
    def noisy() -> str:
        get_run_logger().warning(MESSAGE)
        return flow_run.get_id()

    run_id = noisy()
    APILogHandler().flush()
    return run_id


def run_failing_flow() -> None:
    """A flow run that fails with MESSAGE: the exception's text lands in its state message (and a log line)."""
    from prefect import flow
    from prefect.logging.handlers import APILogHandler

    @flow(name="cdm-test-fails")
    def fails() -> None:
        raise ValueError(MESSAGE)

    with pytest.raises(ValueError):
        fails()
    APILogHandler().flush()


def run_log_messages(run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(run_id)])))
    return [log.message for log in logs]


def event_names_raw(db: Path) -> bool:
    import sqlite3

    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return con.execute("SELECT 1 FROM events WHERE resource LIKE ? LIMIT 1", (f"%{RAW}%",)).fetchone() is not None
    finally:
        con.close()


def db_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file())


def test_run_logs_reach_prefect_redacted_and_the_purge_deletes_what_got_there(tmp_path):
    from flows import api_log_handlers, redact_run_logs
    from tasks.unlearn import prefect_database

    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    key = ws.owner_key(RAW)
    owner_records.update(ws, key, owner=RAW)
    # The control: a run logger without the filter sends the raw id into Prefect's database.
    leaked = run_logging_flow()
    run_failing_flow()  # its state message names the owner too
    assert any(RAW in m for m in run_log_messages(leaked))
    db, server = prefect_database(leaked)
    assert server is None and db is not None and RAW.encode() in db_bytes(db)
    # With the filter every cdm command and serving process puts on Prefect's run loggers.
    redact_run_logs(ws)
    try:
        clean = run_logging_flow()
    finally:
        for h in api_log_handlers():
            for f in [f for f in h.filters if getattr(f, "ws", None) == ws]:
                h.removeFilter(f)
    messages = run_log_messages(clean)
    assert messages and all(RAW not in m for m in messages) and any(key in m for m in messages), messages
    # The purge: the line that got through is deleted and no free page of the file keeps it. (Prefect persists
    # events in batches: wait, bounded, for the failed state's event to be written first, so it is purged too.)
    for _ in range(30):
        if event_names_raw(db):
            break
        time.sleep(1)
    assert stores.purge_prefect_logs(db, RAW, key) >= 3  # the two log lines and the failed state's message
    assert run_log_messages(leaked) == [] and RAW.encode() not in db_bytes(db)
    assert run_log_messages(clean)  # the redacted lines stay


def test_an_api_whose_database_is_not_known_is_reported_not_guessed(monkeypatch):
    """A Prefect server on loopback may keep any file: a candidate database is taken only when it holds the flow run
    in progress; otherwise the API is reported (unscanned), never silently replaced by the client's default."""
    from tasks.unlearn import prefect_database

    run_id = run_logging_flow()
    db, server = prefect_database(run_id)
    assert db is not None and server is None  # the harness's own database holds the run: the control
    db, server = prefect_database(str(uuid.uuid4()))  # a run this database never saw: another server's
    assert db is None and server
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert prefect_database(None) == (None, "http://127.0.0.1:9/api")
