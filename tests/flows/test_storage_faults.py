"""S3 faults during `dvc push`: the real S3 server (moto on loopback) behind a loopback HTTP proxy that can stop
answering mid-push or answer errors. Ingestion retries with backoff, then fails clearly with the workspace as it
was; the objects it pushed before the failure leave the remote once the remote answers again.
"""

from __future__ import annotations

import http.client
import http.server
import threading
from pathlib import Path

import pytest

from cdm.platform import dvc
from cdm.platform.workspace import Workspace, init_workspace
from tests.flows.test_pipeline import owner_folders, small_params, snapshot

pytestmark = pytest.mark.usefixtures("prefect_harness")


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

    def errors(self, n: int) -> None:
        with self.lock:
            self.errors_left = n

    def heal(self) -> None:
        with self.lock:
            self.puts_left, self.errors_left = None, 0

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def faulty(s3_server, s3, tmp_path, monkeypatch):
    """A workspace whose DVC remote is reached through the faulty proxy (boto3 and DVC both use the proxy)."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the workspace's endpoint (the proxy) applies
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own retries, kept short: ours are under test
    proxy = FaultyProxy(s3_server)
    bucket = f"dvc-faults-{tmp_path.name[-12:].lower().replace('_', '-')}"
    s3.create_bucket(Bucket=bucket)
    p = small_params()
    p.data.push_retry_delays = [0.5, 1.0]
    ws = init_workspace(tmp_path / "ws", remote=f"s3://{bucket}/store", endpoint_url=proxy.url, params=p)
    yield ws, proxy, owner_folders(tmp_path / "sources"), s3
    proxy.close()


def owner_objects_on_remote(ws: Workspace, folder: Path, s3) -> set[str]:
    held = {dvc.md5_bytes(f.read_bytes()) for f in folder.rglob("*.png")}
    return held & set(dvc.list_objects(ws.root, s3_client=s3)["remote"])


def test_s3_stopping_mid_push_fails_clearly_changes_nothing_and_is_cleaned_up_later(faulty):
    from flows.ingestion import ingest_owner

    ws, proxy, sources, s3 = faulty
    ingest_owner(str(ws.root), "alice", str(sources["alice"]))
    before = snapshot(ws, s3)
    proxy.drop_after_puts(5)  # the server dies after 5 more uploads
    with pytest.raises(dvc.RemoteError) as err:
        ingest_owner(str(ws.root), "bob", str(sources["bob"]))
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
    ingest_owner(str(ws.root), "carol", str(sources["carol"]))
    assert not owner_objects_on_remote(ws, sources["bob"], s3)
    assert not list(ws.staging_dir.glob("journal-*.json"))
    assert set(ws.owners()) == {"alice", "carol"}
    assert_remote_in_sync(ws)  # every object of the current data/ is on the remote


def test_s3_errors_are_retried_with_backoff_and_the_push_completes(faulty, caplog):
    import logging

    from flows.ingestion import ingest_owner

    ws, proxy, sources, s3 = faulty

    class HealOnRetry(logging.Handler):  # the S3 outage ends while cdm waits to retry
        def emit(self, record):
            if "retrying" in record.getMessage():
                proxy.heal()

    proxy.errors(10**9)  # every request answered 503 until healed: DVC's push fails, ours retries
    handler = HealOnRetry()
    logging.getLogger("cdm.platform.dvc").addHandler(handler)
    try:
        with caplog.at_level("WARNING", logger="cdm.platform.dvc"):
            result = ingest_owner(str(ws.root), "bob", str(sources["bob"]))
    finally:
        logging.getLogger("cdm.platform.dvc").removeHandler(handler)
    assert result["total"] == 60 and proxy.errored > 0
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 1 and "attempt 1 of 3" in retries[0] and "in 0.5 s" in retries[0], retries
    assert len(owner_objects_on_remote(ws, sources["bob"], s3)) == 60
    assert_remote_in_sync(ws)


def assert_remote_in_sync(ws: Workspace) -> None:
    status = dvc.run(ws.root, "status", "--cloud")
    assert "in sync" in status or "up to date" in status, status


def test_unreadable_s3_object_and_missing_bucket_are_refused_naming_them(faulty):
    from cdm.platform.ingest import IngestionRejected
    from cdm.platform.sources import SourceError
    from flows.ingestion import ingest_owner
    from tests.flows.test_pipeline import upload

    ws, proxy, sources, s3 = faulty
    bucket = f"owners-{ws.root.parent.name[-12:].lower().replace('_', '-')}"
    s3.create_bucket(Bucket=bucket)
    upload(s3, sources["dave"], bucket, "dave")
    victim = sorted(p.relative_to(sources["dave"]).as_posix() for p in sources["dave"].rglob("*.png"))[3]
    proxy.denied = victim
    before = snapshot(ws, s3)
    with pytest.raises(IngestionRejected) as err:
        ingest_owner(str(ws.root), "dave", f"s3://{bucket}/dave")
    assert victim in str(err.value) and "unreadable object" in str(err.value), str(err.value)
    with pytest.raises(SourceError, match="does not exist"):
        ingest_owner(str(ws.root), "dave", "s3://no-such-bucket/dave")
    assert snapshot(ws, s3) == before and "dave" not in ws.owners()
