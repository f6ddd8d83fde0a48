"""Fixtures of the platform tests."""

import socket

import pytest


@pytest.fixture
def dead_registry(monkeypatch):
    """An MLflow client of a tracking server that is down (a loopback port nobody listens on), failing at once:
    the registry outage the platform must never read as "absent"."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    return MlflowClient(uri, uri)


@pytest.fixture
def begin_needles():
    """`take(ctx, owner, request_id)`: a revocation record of `owner` (not saved) and its needles file written as
    `begin` writes it, while the owner's data exists."""
    def take(ctx, owner: str, request_id: str):
        from cdm.platform.workspace import owner_records
        from cdm.platform.forgetting.needles import write_needles
        from cdm.platform.forgetting.record import needles_path
        from cdm.platform.forgetting.record import Revocation

        key = ctx.ws.owner_key(owner)
        rev = Revocation(request_id=request_id, owner_key=key, received="now", received_ts=0.0)
        ctx.ws.revocations_dir.mkdir(parents=True, exist_ok=True)
        write_needles(ctx, owner_records.record(ctx.ws, key), needles_path(ctx.ws, request_id))
        return rev

    return take
