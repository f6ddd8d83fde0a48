"""The workspace's persistent Prefect API (flows/prefect_api.py), as users get it: `cdm` commands as new processes
with no PREFECT_API_URL. The first flow command starts it, the next reuses it, a killed one is replaced, anonymous
requests are refused, a revocation run through it verifies clean, and it stops by itself once idle."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cdm.data import digits_uint8, write_class_folders
from cdm.platform.create import init_workspace
from cdm.platform.stack.services import credentials
from cdm.platform.workspace.paths import Workspace
from flows import prefect_api

REPO = Path(__file__).resolve().parents[2]


def cdm(root: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--workspace", str(root)], capture_output=True,
                          text=True, timeout=600, cwd=REPO, env=env)


alive = prefect_api.alive


@pytest.fixture
def persistent_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.pop("CDM_PREFECT_API", None)  # the default: persistent
    env["CDM_PREFECT_IDLE_SECONDS"] = "20"  # longer than a command's start on a busy machine
    return env


def sources_for(tmp_path: Path, n: int) -> list[Path]:
    x, y = digits_uint8()
    out = [tmp_path / f"src{i}" for i in range(n)]
    for i, src in enumerate(out):
        write_class_folders(x[i * 30:(i + 1) * 30], y[i * 30:(i + 1) * 30], src)
    return out


def test_one_api_per_workspace_reused_guarded_and_replaced_after_kill(tmp_path, persistent_env):
    root = tmp_path / "ws"
    init_workspace(root)
    sources = sources_for(tmp_path, 3)

    first = cdm(root, "ingest", "alice", str(sources[0]), "--json", env=persistent_env)
    assert first.returncode == 0, first.stderr
    state = prefect_api.read_state(root)
    assert state is not None and alive(state.pid) and prefect_api.healthy(state, root)

    # The next command reuses it: same process, and its flow run is in that server's database.
    second = cdm(root, "ingest", "bob", str(sources[1]), "--json", env=persistent_env)
    assert second.returncode == 0, second.stderr
    assert prefect_api.read_state(root) == state
    auth = credentials(Workspace(root))["prefect_auth"]
    req = urllib.request.Request(f"{state.url}/flow_runs/count", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read()) >= 2
    # Anonymous requests are refused (only /health answers everyone).
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{state.url}/flow_runs/count", data=b"{}", method="POST",
                                                      headers={"Content-Type": "application/json"}), timeout=10)
    assert refused.value.code == 401

    # Killed with -9: the next command replaces it.
    os.kill(state.pid, signal.SIGKILL)
    third = cdm(root, "ingest", "carol", str(sources[2]), "--json", env=persistent_env)
    assert third.returncode == 0, third.stderr
    replaced = prefect_api.read_state(root)
    assert replaced is not None and replaced.pid != state.pid and prefect_api.healthy(replaced, root)
    prefect_api.stop(replaced, root)
    assert not alive(replaced.pid)


@pytest.mark.slow
def test_a_revocation_through_it_verifies_clean_and_it_stops_when_idle(tmp_path, persistent_env):
    from cdm.platform.forgetting.stores import require_reachable
    from cdm.platform.workspace.context import Context

    root = tmp_path / "ws"
    init_workspace(root)
    sources = sources_for(tmp_path, 2)
    for owner, src in zip(("alice", "bob"), sources):
        done = cdm(root, "ingest", owner, str(src), "--json", env=persistent_env)
        assert done.returncode == 0, done.stderr
    state = prefect_api.read_state(root)

    # A revocation run through it (--wait: the flow runs in this command) verifies clean, the Prefect database
    # included.
    revoked = cdm(root, "revoke", "alice", "--wait", "--json", env=persistent_env)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["verification"]["ok"]

    # Idle (no request for 20 s, no command registered): it stops and removes its record.
    deadline = time.time() + 180
    while time.time() < deadline and alive(state.pid):
        time.sleep(1)
    assert not alive(state.pid)
    assert prefect_api.read_state(root) is None
    assert list((root / ".cdm" / "prefect" / "clients").iterdir()) == []  # each command unregistered at exit

    # The workspace recorded its Prefect home as the store it used, not the stopped server's port: a revocation
    # after the server stopped is not refused as "a store is unreachable".
    assert json.loads(Workspace(root).used_stores_path.read_text())["prefect"] == [str(Workspace(root).prefect_home)]
    require_reachable(Context.load(root))
    # Nothing the server wrote after the purge (events, logs, states persisted late) names the revoked owner.
    for f in (root / ".cdm" / "prefect").rglob("*"):
        if f.is_file():
            assert b"alice" not in f.read_bytes(), f


def test_only_the_workspace_server_itself_is_trusted_or_stopped(tmp_path):
    """A process answering /health on the recorded port is not the server unless it is `flows.prefect_api` for
    this workspace and holds the listening socket; `stop` never signals another process."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    squatter = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    port = squatter.server_address[1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
            assert r.status == 200  # it does answer /health
        assert prefect_api.listens(os.getpid(), port)  # control: the socket check sees this process's socket
        me = prefect_api.ApiState(pid=os.getpid(), port=port, uid=os.getuid(), started=0.0)
        assert not prefect_api.is_server(os.getpid(), tmp_path)  # pytest, not the workspace's server
        assert not prefect_api.healthy(me, tmp_path)
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert not prefect_api.listens(other.pid, port)
            prefect_api.stop(prefect_api.ApiState(pid=other.pid, port=port, uid=os.getuid(), started=0.0),
                             tmp_path)
            time.sleep(0.5)
            assert other.poll() is None  # not signalled: it is not the server
        finally:
            other.kill()
            other.wait()
        assert not prefect_api.alive(other.pid)
    finally:
        squatter.shutdown()


@pytest.mark.parametrize("command", [["status"], ["sample", "--n", "4"], ["revoke", "nobody"], ["train"], ["compose"],
                                     ["evaluate"], ["ingest", "alice", "/nonexistent"]])
def test_commands_that_run_no_flow_load_neither_prefect_nor_torch(tmp_path, persistent_env, command):
    """`cdm status`, a refused sample and a refused revocation answer without Prefect and torch (their import is
    most of a new process's time; a command that loaded Prefect without `workspace_env` routing it would also miss
    the owner-id redaction of Prefect's log handlers); so do flow commands refused on bad input (nothing to train,
    compose or evaluate; no such source folder), before any API server starts."""
    root = tmp_path / "ws"
    init_workspace(root)
    probe = ("import sys\nfrom flows.cli import main\ncode = main(sys.argv[1:])\n"
             "print('LOADED', code, sorted(m for m in ('prefect', 'torch', 'diffusers') if m in sys.modules), "
             "file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", probe, *command, "--workspace", str(root)], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=persistent_env)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED")][-1]
    assert line.endswith("[]"), line
    assert (line.split()[1] == "0") == (command == ["status"])  # status answers; the other two are refused
    assert prefect_api.read_state(root) is None  # and no server was started
