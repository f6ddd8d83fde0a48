"""The servers cdm starts on the embedded default authenticate: `cdm serve`'s Prefect server (its auth string)
and `cdm ui`'s MLflow UI (MLflow's basic-auth app), each refusing an anonymous request to its API while its
health check and an authenticated request answer (the positive controls). On the old code both answered anyone:
a local user could pause or delete `on-revocation`, move `production` or delete a `cdm.revoked` tag."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import urllib.error
import urllib.request

from cdm.platform.create import init_workspace
from cdm.platform.stack.services import credentials, free_port


def status(url: str, data: bytes | None = None, auth: str | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-2000:] if proc.stdout else "exited"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer")


def test_the_prefect_server_of_cdm_serve_refuses_anonymous_requests(tmp_path):
    from flows.deployments import start_local_server

    ws = init_workspace(tmp_path / "ws")
    auth = credentials(ws)["prefect_auth"]
    port = free_port()
    proc = start_local_server(auth, port=port)
    try:
        api = f"http://127.0.0.1:{port}/api"
        assert status(f"{api}/health") == 200
        assert status(f"{api}/deployments/filter", b"{}") == 401
        assert status(f"{api}/deployments/filter", b"{}", auth=auth) == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cdm_ui_serves_the_registry_only_to_its_admin(tmp_path):
    ws = init_workspace(tmp_path / "ws")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port), "--workspace",
                             str(ws.root)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait(f"{url}/health", proc)
        search = f"{url}/api/2.0/mlflow/registered-models/search"
        c = credentials(ws)
        assert status(search) == 401
        assert status(search, auth=f"{c['mlflow_user']}:wrong") == 401
        assert status(search, auth=f"{c['mlflow_user']}:{c['mlflow_password']}") == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
