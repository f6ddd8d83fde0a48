"""Shared test settings and real components: CPU only, offline; a moto S3 server on loopback; one Prefect test
harness per session (it costs ~20 s to enter)."""

import os

from flows.cli import env_defaults  # noqa: E402

env_defaults()  # the CLI's: Prefect start-up timeout, telemetry off
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Credentials for the loopback S3 server (moto accepts any).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server on 127.0.0.1 (moto's ThreadedMotoServer). Yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")}
    os.environ["AWS_ENDPOINT_URL"] = url
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = url
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
