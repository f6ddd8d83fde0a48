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


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent: it was started detached) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(") ", 1)[1][0] != "Z"


@pytest.fixture
def persistent_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.pop("CDM_PREFECT_API", None)  # the default: persistent
    env["CDM_PREFECT_IDLE_SECONDS"] = "8"
    return env


def test_one_api_per_workspace_reused_replaced_guarded_and_stopped_when_idle(tmp_path, persistent_env):
    root = tmp_path / "ws"
    init_workspace(root)
    x, y = digits_uint8()
    sources = [tmp_path / f"src{i}" for i in range(3)]
    for i, src in enumerate(sources):
        write_class_folders(x[i * 30:(i + 1) * 30], y[i * 30:(i + 1) * 30], src)

    first = cdm(root, "ingest", "alice", str(sources[0]), "--json", env=persistent_env)
    assert first.returncode == 0, first.stderr
    state = prefect_api.read_state(root)
    assert state is not None and alive(state.pid) and prefect_api.healthy(state)

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
    assert replaced is not None and replaced.pid != state.pid and prefect_api.healthy(replaced)

    # A revocation run through it (--wait: the flow runs in this command) verifies clean, the Prefect database
    # included.
    revoked = cdm(root, "revoke", "alice", "--wait", "--json", env=persistent_env)
    assert revoked.returncode == 0, revoked.stderr
    cert = json.loads(revoked.stdout)
    assert cert["verification"]["ok"], cert["verification"]

    # Idle (no request for 8 s, no command registered): it stops and removes its record.
    deadline = time.time() + 90
    while time.time() < deadline and alive(replaced.pid):
        time.sleep(1)
    assert not alive(replaced.pid)
    assert prefect_api.read_state(root) is None
    assert list((root / ".cdm" / "prefect" / "clients").iterdir()) == []  # each command unregistered at exit
    # Nothing the server wrote after the purge (events, logs, states persisted late) names the revoked owner.
    for f in (root / ".cdm" / "prefect").rglob("*"):
        if f.is_file():
            assert b"alice" not in f.read_bytes(), f
    assert b"alice" not in (root / ".cdm" / "logs" / "prefect-api.log").read_bytes()


def test_a_record_of_another_user_or_a_dead_process_is_not_trusted(tmp_path):
    me = prefect_api.ApiState(pid=os.getpid(), port=prefect_api.free_port(), uid=os.getuid(), started=0.0)
    assert not prefect_api.healthy(me)  # alive and ours, but nothing answers on that port
    other = prefect_api.ApiState(pid=os.getpid(), port=me.port, uid=os.getuid() + 1, started=0.0)
    assert not prefect_api.healthy(other)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not prefect_api.healthy(prefect_api.ApiState(pid=gone.pid, port=me.port, uid=os.getuid(), started=0.0))
