"""kill -9 in the middle of real CLI runs, then a rerun: the job completes and nothing is left half-done.

Slow (each CLI process starts Prefect, MLflow and torch): run with `make test-slow`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdm import registry
from cdm.config import Params
from cdm.workspace import Workspace, init_workspace
from tests.flows.test_pipeline import owner_folders

pytestmark = pytest.mark.slow
CDM = [sys.executable, "-m", "flows.cli"]


def run_cdm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CDM, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[2])


def start_cdm(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*CDM, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[2])


def kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> tuple[Workspace, dict]:
    tmp = tmp_path_factory.mktemp("faults")
    p = Params()
    p.train.steps, p.train.batch_size, p.train.num_slices, p.train.min_shard_samples = 200, 32, 2, 120
    p.compose.num_inference_steps, p.evaluate.n_samples, p.evaluate.feature_steps = 10, 60, 100
    ws = init_workspace(tmp / "ws", params=p)
    sources = owner_folders(tmp / "sources")
    for owner in ("alice", "bob", "carol"):
        assert run_cdm("ingest", owner, str(sources[owner]), "--workspace", str(ws.root)).returncode == 0
    return ws, sources


@pytest.mark.parametrize("stop_after", ["go_live", "retrain", "purge"])
def test_unlearning_killed_after_a_step_completes_on_rerun(ws, stop_after):
    ws, _ = ws
    assert run_cdm("train", "--workspace", str(ws.root)).returncode == 0
    assert run_cdm("compose", "--workspace", str(ws.root)).returncode == 0
    owner = {"go_live": "carol", "retrain": "bob", "purge": "alice"}[stop_after]  # three owners, three revocations
    key = ws.owner_key(owner)
    state = ws.revocations_dir / f"{key}.json"
    proc = start_cdm("revoke", owner, "--workspace", str(ws.root))
    killed = kill_when(proc, lambda: state.exists() and stop_after in json.loads(state.read_text())["steps_done"])
    assert killed, "the revocation finished before it could be killed"
    done = run_cdm("revoke", owner, "--workspace", str(ws.root), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    cert = json.loads(done.stdout)
    assert cert["verification"]["ok"], cert["verification"]
    c = registry.client(ws.tracking_uri)
    for mv in registry.versions(c, registry.COMPOSITE):  # no composite references a deleted model
        for sid, v in json.loads(mv.tags["cdm.components"]).items():
            c.get_model_version(registry.SHARD_PREFIX + sid, v)
    assert run_cdm("revoke", owner, "--workspace", str(ws.root)).returncode == 2


def test_ingestion_killed_mid_commit_leaves_the_workspace_as_before_after_recovery(ws, tmp_path):
    ws, sources = ws
    proc = start_cdm("ingest", "dave", str(sources["dave"]), "--workspace", str(ws.root))
    journal_seen = kill_when(proc, lambda: any(ws.staging_dir.glob("journal-*.json")))
    assert journal_seen
    # The next ingestion (of anyone) first undoes the interrupted one; a bad batch changes nothing else.
    bad = tmp_path / "empty"
    bad.mkdir()
    assert run_cdm("ingest", "erin", str(bad), "--workspace", str(ws.root)).returncode == 2
    assert run_cdm("ingest", "dave", str(sources["dave"]), "--workspace", str(ws.root)).returncode == 0
    assert "dave" in ws.owners() and len(ws.manifest("dave")["samples"]) == 20
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "data.dvc"], cwd=ws.root, capture_output=True,
                            text=True)
    assert "up to date" in status.stdout, status.stdout  # data/ is exactly what data.dvc records


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = run_cdm("demo", "--quick", "--out", str(out), "--json", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["verification_ok"] and "does not decode" in summary["rejected_batch"]
    assert (out / "outputs" / "samples-before.png").is_file()
