"""Shared test settings, real components and fixtures: CPU only, offline; a moto S3 server on loopback (and a
faulty HTTP proxy in front of it); one Prefect test harness per session (it costs ~20 s to enter); factories for
workspaces, digit owners and interrupted ingestions."""

import http.client
import http.server
import os
import subprocess
import threading
from pathlib import Path

from flows.cli import env_defaults  # noqa: E402

env_defaults()  # the CLI's: Prefect start-up timeout, telemetry off
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One ephemeral Prefect server per command, as before the workspace's persistent API (flows/prefect_api.py): the
# suite's workspaces are temporary folders a lasting server would outlive. tests/flows/test_prefect_api.py runs the
# persistent one.
os.environ.setdefault("CDM_PREFECT_API", "ephemeral")
# Credentials for the loopback S3 server (moto accepts any).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test`: 2 workers on 2 cores) one thread per worker, and per command a test starts: two
# workers of two threads each ran the suite slower than one (the tiny models gain nothing from a second thread).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
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


@pytest.fixture(scope="session")
def small_params():
    """A factory of fast settings: shards of 40 steps, small evaluations; bob + carol share a shard."""
    from cdm.config import Params

    def make():
        p = Params()
        p.train.steps, p.train.batch_size, p.train.num_slices = 40, 32, 2
        p.train.min_shard_samples = 120
        p.compose.num_inference_steps, p.compose.router_steps = 10, 50
        p.evaluate.n_samples, p.evaluate.feature_steps = 60, 100
        p.evaluate.sets, p.evaluate.nll_steps = 2, 10
        return p

    return make


@pytest.fixture(scope="session")
def digit_owners():
    """A factory: writes owners' folders of bundled digits under `root` ({owner: folder})."""
    import numpy as np

    from cdm.data import digits_uint8, write_class_folders

    def make(root: Path, pick: dict | None = None) -> dict[str, Path]:
        images, labels = digits_uint8()
        rng = np.random.default_rng(0)
        pick = pick or {"alice": (labels <= 3, 200), "bob": ((labels >= 4) & (labels <= 6), 60),
                        "carol": (labels >= 7, 70), "dave": (labels == 1, 20)}
        out = {}
        for owner, (mask, n) in pick.items():
            idx = rng.choice(np.flatnonzero(mask), n, replace=False)
            write_class_folders(images[idx], labels[idx], root / owner)
            out[owner] = root / owner
        if "alice" in out:
            (root / "alice" / "owner.yaml").write_text("license: cc-by\ncontact: alice@example.org\n")
        return out

    return make


@pytest.fixture(scope="session")
def workspace_snapshot():
    """A factory: the state a refused request must leave unchanged (data files, git HEAD, data.dvc, remote)."""
    def take(ws, s3=None) -> dict:
        from cdm.platform.data import dvc

        files = sorted(str(p.relative_to(ws.root)) for p in ws.data_dir.rglob("*"))
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True).stdout
        return {"files": files, "head": head, "dvc": (ws.root / "data.dvc").read_text(),
                "remote": sorted(dvc.list_objects(ws.root, s3_client=s3)["remote"])}

    return take


@pytest.fixture(scope="session")
def interrupted_ingestion():
    """A factory: the state a kill -9 leaves between `dvc add` and the git commit of an owner's batch."""
    def make(ctx, owner: str, source: Path, png: bytes):
        from cdm.platform.data import dvc
        from cdm.platform.workspace import owner_records
        from cdm.platform.data.ingest import _begin_journal, _write_owner_files

        key = ctx.ws.owner_key(owner)
        owner_records.update(ctx.ws, key, owner=owner, source=str(source))
        _begin_journal(ctx.ws, key, owner, ctx.ws.owner_dir(owner), [png])
        _write_owner_files(ctx.ws, key, owner, [("2", png, None)], {})
        dvc.add_and_push(ctx.ws.root, push=False)
        return key, [png]

    return make


class FaultyProxy:
    """Forwards HTTP requests to `upstream`; `drop_after_puts(n)` stops answering (connections closed without a
    response, as when the server process dies) after n more PUTs; `errors(n)` answers the next n requests with
    503 SlowDown; `heal()` forwards everything again."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.lock = threading.Lock()
        self.puts_left: int | None = None  # None: no drop scheduled
        self.errors_left = 0
        self.denied: str | None = None  # GETs of paths containing this answer 403 AccessDenied
        self.drops_left = 0  # the next n requests (any method) get no answer
        self.dropped = self.errored = self.forwarded_puts = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                verdict = proxy._verdict(self.command, self.path)
                if verdict == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if verdict in ("error", "deny"):
                    code, status = ("SlowDown", 503) if verdict == "error" else ("AccessDenied", 403)
                    msg = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _verdict(self, method: str, path: str) -> str:
        with self.lock:
            if method == "GET" and self.denied and self.denied in path:
                return "deny"
            if self.drops_left > 0:
                self.drops_left -= 1
                self.dropped += 1
                return "drop"
            if self.puts_left is not None and self.puts_left <= 0:
                self.dropped += 1
                return "drop"
            if self.errors_left > 0:
                self.errors_left -= 1
                self.errored += 1
                return "error"
            if method == "PUT":
                self.forwarded_puts += 1
                if self.puts_left is not None:
                    self.puts_left -= 1
            return "forward"

    def drop_after_puts(self, n: int) -> None:
        with self.lock:
            self.puts_left = n

    def drop_next(self, n: int) -> None:
        with self.lock:
            self.drops_left = n

    def errors(self, n: int) -> None:
        with self.lock:
            self.errors_left = n

    def heal(self) -> None:
        with self.lock:
            self.puts_left, self.errors_left = None, 0

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def faulty_proxy():
    """A factory of `FaultyProxy`s in front of an upstream URL; closed after the test."""
    made = []

    def make(upstream: str) -> FaultyProxy:
        made.append(FaultyProxy(upstream))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()
