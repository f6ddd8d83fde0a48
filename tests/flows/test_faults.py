"""kill -9 in the middle of real CLI runs, then a rerun: the job completes and nothing is left half-done.

Slow (each CLI process starts Prefect, MLflow and torch): run with `make test-slow`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cdm.config import Params
from cdm.platform.workspace import owner_records
from cdm.platform.models import registry
from cdm.platform.create import init_workspace
from cdm.platform.workspace.paths import Workspace

pytestmark = pytest.mark.slow
CDM = [sys.executable, "-m", "flows.cli"]


def run_cdm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CDM, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[2])


def start_cdm(*args: str) -> subprocess.Popen:
    """The command in its own process group, so that `kill_when` kills what it started with it."""
    return subprocess.Popen([*CDM, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> bool:
    """kill -9 the command once `condition()` holds, with its process group: the Prefect server of its own that an
    ephemeral API starts (tests/conftest.py) dies with it instead of outliving the test (a background revocation is
    a session of its own, and lives on)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    return False


def ingested_workspace(tmp: Path, owners: tuple[str, ...], steps: int, min_shard_samples: int, owner_folders
                       ) -> tuple[Workspace, dict]:
    """A small workspace with `owners` ingested through the CLI."""
    p = Params()
    p.train.steps, p.train.batch_size, p.train.num_slices, p.train.min_shard_samples = steps, 32, 2, min_shard_samples
    p.compose.num_inference_steps, p.evaluate.n_samples, p.evaluate.feature_steps = 10, 60, 100
    ws = init_workspace(tmp / "ws", params=p)
    sources = {**owner_folders(tmp / "sources"), **extra_owner_folders(tmp / "sources")}
    for owner in owners:
        assert run_cdm("ingest", owner, str(sources[owner]), "--workspace", str(ws.root)).returncode == 0
    return ws, sources


@pytest.fixture(scope="module")
def ws(tmp_path_factory, digit_owners) -> tuple[Workspace, dict]:
    return ingested_workspace(tmp_path_factory.mktemp("faults"), ("alice", "bob", "carol", "erin", "frank", "gina"),
                              steps=200, min_shard_samples=120, owner_folders=digit_owners)


def extra_owner_folders(root: Path) -> dict[str, Path]:
    from cdm.data import digits_uint8, write_class_folders

    images, labels = digits_uint8()
    out = {}
    for i, owner in enumerate(("erin", "frank", "gina")):
        idx = list(range(1000 + 60 * i, 1060 + 60 * i))
        write_class_folders(images[idx], labels[idx], root / owner)
        out[owner] = root / owner
    return out


# One revocation per step, each of a different owner; a kill after `certify` would find the work done.
KILL_AFTER = {"plan": "erin", "go_live": "carol", "retrain": "bob", "forgetting_check": "frank", "purge": "alice",
              "verify": "gina"}


def steps_done(ws: Workspace, owner: str) -> list[str]:
    from cdm.platform.forgetting.record import load

    rec = owner_records.record(ws, ws.owner_key(owner))
    try:
        return load(ws, rec.revocation).steps_done if rec and rec.revocation else []
    except (OSError, ValueError):  # being written
        return []


@pytest.mark.parametrize("stop_after", list(KILL_AFTER))
def test_unlearning_killed_after_a_step_completes_on_rerun(ws, stop_after):
    ws, _ = ws
    assert run_cdm("train", "--workspace", str(ws.root)).returncode == 0
    assert run_cdm("compose", "--workspace", str(ws.root)).returncode == 0
    owner = KILL_AFTER[stop_after]
    proc = start_cdm("revoke", owner, "--wait", "--workspace", str(ws.root))
    killed = kill_when(proc, lambda: stop_after in steps_done(ws, owner))
    assert killed, "the revocation finished before it could be killed"
    done = run_cdm("revoke", owner, "--wait", "--workspace", str(ws.root), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    cert = json.loads(done.stdout)
    assert cert["verification"]["ok"], cert["verification"]
    c = registry.client(ws.tracking_uri())
    for mv in registry.versions(c, registry.COMPOSITE):  # no composite references a deleted model
        for sid, v in json.loads(mv.tags["cdm.components"]).items():
            c.get_model_version(registry.SHARD_PREFIX + sid, v)
    assert run_cdm("revoke", owner, "--workspace", str(ws.root)).returncode == 2


# kill -9 *inside* a step: the process kills itself at a fault point the test arms (CDM_FAULT), between two writes
# of the step. Each point revokes another owner of a workspace of its own.
FAULT_POINTS = {"begin:after-record": "kill01", "begin:after-mark": "kill09", "go_live:after-shard-plan": "kill02",
                "retrain:before-compose": "kill03", "purge:after-intent": "kill04", "purge:after-mlflow": "kill05",
                "purge:after-commit": "kill06", "certify:after-ledger": "kill07", "certify:after-complete": "kill08"}
BEFORE_LIVE = ("begin:after-record", "begin:after-mark", "go_live:after-shard-plan")


@pytest.fixture(scope="module")
def ws_faults(tmp_path_factory) -> Workspace:
    """Nine owners of 60 digits each, alone in their shards, and kill03 sharing one with kill10 (30 each, so
    `retrain` has work to do)."""
    from cdm.data import digits_uint8, write_class_folders

    tmp = tmp_path_factory.mktemp("inside")
    p = Params()
    p.train.steps, p.train.batch_size, p.train.num_slices, p.train.min_shard_samples = 60, 32, 2, 50
    p.compose.num_inference_steps, p.evaluate.n_samples, p.evaluate.feature_steps = 10, 60, 100
    ws = init_workspace(tmp / "ws", params=p)
    images, labels = digits_uint8()
    sizes = {f"kill{i:02d}": 60 for i in range(1, 10)} | {"kill03": 30, "kill10": 30}
    start = 0
    for owner, n in sorted(sizes.items()):
        write_class_folders(images[start:start + n], labels[start:start + n], tmp / "src" / owner)
        start += n
        assert run_cdm("ingest", owner, str(tmp / "src" / owner), "--workspace", str(ws.root)).returncode == 0
    assert run_cdm("train", "--workspace", str(ws.root)).returncode == 0
    return ws


@pytest.mark.parametrize("point", list(FAULT_POINTS))
def test_unlearning_killed_inside_a_step_completes_on_rerun(ws_faults, point):
    ws, owner = ws_faults, FAULT_POINTS[point]
    assert run_cdm("compose", "--workspace", str(ws.root)).returncode == 0
    # Its own process group: the Prefect API server a killed command had started is not its child any more, and
    # would keep the pipes (and the workspace's Prefect database) open; it is killed with the group, as a crashed
    # machine would lose it.
    with tempfile.TemporaryFile() as err:
        killed = subprocess.Popen([*CDM, "revoke", owner, "--wait", "--workspace", str(ws.root)], stdout=err,
                                  stderr=err, cwd=Path(__file__).resolve().parents[2], start_new_session=True,
                                  env={**os.environ, "CDM_FAULT": point})
        code = killed.wait(timeout=900)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)
        err.seek(0)
        assert code == -signal.SIGKILL, (code, err.read()[-2000:])
    key = ws.owner_key(owner)
    c = registry.client(ws.tracking_uri())
    prod = registry.alias_version(c, registry.COMPOSITE)
    if point not in BEFORE_LIVE:  # after going live: production is without them
        assert prod is not None and key not in json.loads(prod.tags["cdm.owner_keys"]), point
    if point == "begin:after-mark":  # not accepted yet, but running servers already drop the owner's versions
        assert all(mv.tags.get(registry.REVOKED) for mv in registry.all_versions(c)
                   if key in json.loads(mv.tags.get("cdm.owner_keys", "[]")))
    done = run_cdm("revoke", owner, "--wait", "--workspace", str(ws.root), "--json")
    if point == "certify:after-complete":  # it was complete: the rerun says so, and the needles file is gone
        assert done.returncode == 2 and "already revoked" in done.stderr, done.stderr
        assert not list(ws.revocations_dir.glob("*.needles.json"))
        return
    assert done.returncode == 0, done.stderr[-2000:]
    cert = json.loads(done.stdout)
    assert cert["verification"]["ok"], cert["verification"]
    # The rerun searched for what the first run would have, the owner's files and pixels included, even where the
    # killed run had deleted them (purge:after-commit): the needles come from the file taken at `begin`.
    searched = cert["verification"]["needles"]
    assert cert["verification"]["pixel_search"] and not cert["verification"]["needles_missing"], point
    assert searched.get("sample file bytes", 0) > 0 and searched.get("sample pixels", 0) > 0, (point, searched)
    prod = registry.alias_version(c, registry.COMPOSITE)
    assert prod is not None and key not in json.loads(prod.tags["cdm.owner_keys"])
    from cdm.platform.workspace import ledger

    from cdm.platform.forgetting.record import load

    # One ledger entry, whose hash is the certificate's (a rerun after a kill in certify certifies the same document).
    recorded = load(ws, cert["request_id"]).certify
    entries = [e for e in ledger.read(ws.ledger_path) if e.get("request_id") == cert["request_id"]]
    body = {k: v for k, v in recorded.items() if k not in ("ledger", "audit_run")}
    assert len(entries) == 1 and entries[0]["certificate_sha256"] == hashlib.sha256(
        json.dumps(body, sort_keys=True).encode()).hexdigest()
    assert registry.versions_tagged(c, key) == []
    for mv in registry.versions(c, registry.COMPOSITE):  # no composite references a deleted model
        for sid, v in json.loads(mv.tags["cdm.components"]).items():
            c.get_model_version(registry.SHARD_PREFIX + sid, v)
    assert not (ws.owners_dir / owner).exists() and not list(ws.revocations_dir.glob("*.needles.json"))


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


# -- training and composition killed while logging; ingestion concurrent with a revocation -----------------------


def running_runs(ws: Workspace) -> list[str]:
    c = registry.client(ws.tracking_uri())
    exp = c.get_experiment_by_name(registry.EXPERIMENT)
    return [r.info.run_id for r in c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")]


def logging_runs(ws: Workspace, slices: int) -> list[str]:
    """Open runs whose shard has all its slice checkpoints (its training is done; the model is being logged)."""
    from mlflow.exceptions import MlflowException

    c, out = registry.client(ws.tracking_uri()), []
    for r in running_runs(ws):
        try:
            shard = c.get_run(r).data.tags["cdm.shard"]
        except MlflowException:  # ended and deleted between the search and this look
            continue
        if len(list((ws.checkpoints_dir / shard).glob("*.safetensors"))) >= slices:
            out.append(r)
    return out


def run_state(ws: Workspace, run_id: str) -> tuple[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        run = registry.client(ws.tracking_uri()).get_run(run_id)
    except MlflowException:
        return None
    return run.info.status, run.info.lifecycle_stage


@pytest.fixture(scope="module")
def ws2(tmp_path_factory, digit_owners) -> tuple[Workspace, dict]:
    return ingested_workspace(tmp_path_factory.mktemp("faults2"), ("alice", "bob", "carol"), steps=120,
                              min_shard_samples=1, owner_folders=digit_owners)


def test_training_killed_while_logging_is_swept_and_completed_by_a_rerun(ws2):
    ws, _ = ws2
    proc = start_cdm("train", "--workspace", str(ws.root))
    seen: list[str] = []
    # Killed while logging: a run is open and its shard's training is over (both slice checkpoints written). A kill
    # on the first sight of a run could land inside the training instead (on a busy machine it did: no slice saved,
    # nothing to resume from), which is not what this test is about.
    assert kill_when(proc, lambda: bool(seen.extend(logging_runs(ws, slices=2)) or seen)), \
        "no run seen logging before training ended"
    dead = seen[0]
    assert run_state(ws, dead)[0] == "RUNNING"
    sid = registry.client(ws.tracking_uri()).get_run(dead).data.tags["cdm.shard"]
    done = run_cdm("train", "--workspace", str(ws.root), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert len(result["shards"]) == 3 and not running_runs(ws)
    # The shard whose logging was killed resumed from its last slice checkpoint instead of training again (or, if
    # the kill came after its version was registered, was complete and skipped).
    killed = result["shards"][sid]
    assert killed["skipped"] or killed["resumed_from_slice"] == 1, killed
    # A killed run that registered no version is gone with its artifacts; one that did is ended as KILLED.
    state = run_state(ws, dead)
    assert state is None or (state == ("KILLED", "active") and killed["skipped"]), state
    assert not list(ws.checkpoints_dir.rglob("*.tmp"))


def test_composition_killed_while_logging_is_completed_by_a_rerun(ws2):
    ws, _ = ws2
    proc = start_cdm("compose", "--workspace", str(ws.root))
    assert kill_when(proc, lambda: bool(running_runs(ws))), "the composition finished before it could be killed"
    done = run_cdm("compose", "--workspace", str(ws.root), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not running_runs(ws)
    c = registry.client(ws.tracking_uri())
    live = c.get_model_version_by_alias(registry.COMPOSITE, registry.PRODUCTION)
    for sid, v in json.loads(live.tags["cdm.components"]).items():
        c.get_model_version(registry.SHARD_PREFIX + sid, v)


def test_ingestion_concurrent_with_a_revocation_gives_the_sequential_result(ws2):
    from cdm.platform.data import dvc
    from cdm.platform.workspace import ledger

    ws, sources = ws2
    bob_md5 = {dvc.md5_bytes(f.read_bytes()) for f in sources["bob"].rglob("*.png")}
    dave_md5 = {dvc.md5_bytes(f.read_bytes()) for f in sources["dave"].rglob("*.png")}
    expected_files = sorted(str(p.relative_to(ws.root)) for o in ("alice", "carol")
                            for p in ws.owner_dir(o).rglob("*") if p.is_file())
    ingest = start_cdm("ingest", "dave", str(sources["dave"]), "--workspace", str(ws.root))
    revoke = subprocess.Popen([*CDM, "revoke", "bob", "--wait", "--workspace", str(ws.root), "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    out, err = revoke.communicate(timeout=900)
    assert ingest.wait(timeout=900) == 0
    assert revoke.returncode == 0, err[-2000:]
    assert json.loads(out)["verification"]["ok"]
    # Sequential result: alice and carol untouched, dave complete, bob gone from data, cache and remote.
    assert sorted(ws.owners()) == ["alice", "carol", "dave"]
    files = sorted(str(p.relative_to(ws.root)) for o in ("alice", "carol") for p in ws.owner_dir(o).rglob("*")
                   if p.is_file())
    assert files == expected_files
    assert len(ws.manifest("dave")["samples"]) == 20
    listing = dvc.list_objects(ws.root)
    assert dave_md5 <= set(listing["cache"]) and dave_md5 <= set(listing["remote"])
    assert not (bob_md5 - dave_md5) & (set(listing["cache"]) | set(listing["remote"]))
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "data.dvc"], cwd=ws.root, capture_output=True,
                            text=True)
    assert "up to date" in status.stdout, status.stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "data.dvc"], cwd=ws.root, capture_output=True, text=True)
    assert dirty.stdout == ""  # both commits landed
    records = owner_records.records(ws)
    assert records[ws.owner_key("bob")].state == "revoked" and records[ws.owner_key("dave")].state == "active"
    assert ledger.verify(ws.ledger_path, ws.secret()).ok
