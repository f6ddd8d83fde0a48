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
