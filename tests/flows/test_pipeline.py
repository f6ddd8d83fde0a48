"""The pipeline end to end with real components: a moto S3 server on loopback (owner source, DVC remote, MLflow
artifacts), MLflow on SQLite, real DVC and git commands, Prefect flows under the test harness.

Story: alice (from S3), bob and carol (folders; small, so they share a shard) are ingested; a bad batch is
rejected; shards and paragon are trained; a composite goes live; carol revokes.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cdm.platform import dvc, ledger, registry
from cdm.config import Params
from cdm.data import digits_uint8, write_class_folders
from cdm.platform.ingest import IngestionRejected
from cdm.platform.workspace import Workspace, init_workspace
from flows.cli import main as cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


def small_params() -> Params:
    p = Params()
    p.train.steps, p.train.batch_size, p.train.num_slices = 40, 32, 2
    p.train.min_shard_samples = 120  # bob + carol share a shard
    p.compose.num_inference_steps, p.compose.router_steps = 10, 50
    p.evaluate.n_samples, p.evaluate.feature_steps = 60, 100
    return p


def owner_folders(root: Path) -> dict[str, Path]:
    images, labels = digits_uint8()
    rng = np.random.default_rng(0)
    pick = {"alice": (labels <= 3, 200), "bob": ((labels >= 4) & (labels <= 6), 60), "carol": (labels >= 7, 70),
            "dave": (labels == 1, 20)}
    out = {}
    for owner, (mask, n) in pick.items():
        idx = rng.choice(np.flatnonzero(mask), n, replace=False)
        write_class_folders(images[idx], labels[idx], root / owner)
        out[owner] = root / owner
    (root / "alice" / "owner.yaml").write_text("license: cc-by\ncontact: alice@example.org\n")
    return out


def upload(s3, folder: Path, bucket: str, prefix: str) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(folder).as_posix()}", Body=f.read_bytes())


def snapshot(ws: Workspace, s3) -> dict:
    files = sorted(str(p.relative_to(ws.root)) for p in ws.data_dir.rglob("*"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True).stdout
    return {"files": files, "head": head, "dvc": (ws.root / "data.dvc").read_text(),
            "remote": sorted(dvc.list_objects(ws.root, s3_client=s3)["remote"])}


@pytest.fixture(scope="module")
def story(tmp_path_factory, s3, s3_server):
    from flows.composition import compose
    from flows.ingestion import ingest_owner
    from flows.training import run_training
    from flows.unlearning import unlearn_owner

    tmp = tmp_path_factory.mktemp("pipeline")
    for bucket in ("owners", "dvc", "mlflow"):
        s3.create_bucket(Bucket=bucket)
    sources = owner_folders(tmp / "sources")
    upload(s3, sources["alice"], "owners", "alice")
    ws = init_workspace(tmp / "ws", remote="s3://dvc/store", endpoint_url=s3_server,
                        artifact_root="s3://mlflow/artifacts", params=small_params())
    out = {"ws": ws, "sources": sources}
    out["ingest"] = {"alice": ingest_owner(str(ws.root), "alice", "s3://owners/alice"),
                     "bob": ingest_owner(str(ws.root), "bob", str(sources["bob"]), "cc-by")}
    # A bad batch: one truncated PNG among good files.
    bad = tmp / "bad-dave"
    shutil.copytree(sources["dave"], bad)
    victim = sorted(bad.glob("*/*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:30])
    out["before_bad"] = snapshot(ws, s3)
    with pytest.raises(IngestionRejected) as rejected:
        ingest_owner(str(ws.root), "dave", str(bad))
    out["rejected"] = rejected.value
    out["after_bad"] = snapshot(ws, s3)
    out["ingest"]["carol"] = ingest_owner(str(ws.root), "carol", str(sources["carol"]), "proprietary")
    out["train"] = run_training(str(ws.root), paragon=True)
    out["train_again"] = run_training(str(ws.root))
    out["compose"] = compose(str(ws.root))
    out["carol_key"] = ws.owner_key("carol")
    c = registry.client(ws.tracking_uri)
    out["carol_versions"] = [(mv.name, mv.version, mv.run_id) for m in c.search_registered_models()
                             for mv in registry.versions(c, m.name)
                             if out["carol_key"] in mv.tags.get("cdm.owner_keys", "")]
    out["carol_md5"] = {dvc.md5_bytes(p.read_bytes()) for p in ws.owner_dir("carol").rglob("*.png")}
    out["certificate"] = unlearn_owner(str(ws.root), "carol", "test", out["ingest"]["carol"]["token"])
    return out


def test_ingestion_reads_s3_and_pushes_to_the_s3_remote(story, s3):
    ws = story["ws"]
    assert ws.manifest("alice")["license"] == "cc-by" and len(ws.manifest("alice")["samples"]) == 200
    md5s = {dvc.md5_bytes(p.read_bytes()) for p in ws.owner_dir("alice").rglob("*.png")}
    assert md5s <= dvc.list_objects(ws.root, s3_client=s3)["remote"]
    assert story["ingest"]["alice"]["token"] and story["ingest"]["bob"]["data_hash"].endswith(".dir")


def test_rejected_batch_names_the_file_and_changes_nothing(story):
    problems = story["rejected"].report.problems
    assert len(problems) == 1 and "does not decode" in problems[0].reason
    assert story["before_bad"] == story["after_bad"]
    assert not (story["ws"].owners_dir / "dave").exists()
    assert Path(story["rejected"].report.docs).is_file()  # Data Docs kept


def test_shard_versions_carry_provenance_without_raw_owner_ids(story):
    ws = story["ws"]
    c = registry.client(ws.tracking_uri)
    mv = registry.latest(c, registry.SHARD_PREFIX + next(s for s, o in json.loads(
        (ws.state_dir / "shards.json").read_text()).items() if o == ["alice"]))
    for tag in ("cdm.owner_keys", "cdm.manifest_sha256", "cdm.dvc_data_hash", "cdm.samples", "cdm.class_counts",
                "cdm.config_hash", "cdm.code_version", "cdm.slice_keys", "cdm.weights_sha256"):
        assert mv.tags.get(tag), tag
    assert json.loads(mv.tags["cdm.owner_keys"]) == [ws.owner_key("alice")]
    db = sqlite3.connect(ws.tracking_uri.removeprefix("sqlite:///"))
    values = " ".join(v for (v,) in db.execute("select value from model_version_tags union all "
                                               "select value from registered_model_tags union all "
                                               "select value from tags"))
    for owner in ("alice", "bob", "carol"):
        assert owner not in values


def test_training_plan_groups_small_owners_and_skips_unchanged(story):
    shards = story["train"]["shards"]
    assert len(shards) == 2 and story["train"]["paragon"]["version"] == "1"
    assert all(r["skipped"] for r in story["train_again"]["shards"].values())


def test_composite_serves_attribution_and_respects_consumer_rights(story, capsys):
    import mlflow

    ws = story["ws"]
    registry.client(ws.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{registry.COMPOSITE}@{registry.PRODUCTION}")
    out = model.predict({"n": 6, "seed": 0, "allowed_owners": [ws.owner_key("alice")]})
    assert out["images"].shape == (6, 1, 8, 8)
    assert all(a[ws.owner_key("bob")] == 0.0 and abs(a[ws.owner_key("alice")] - 1) < 1e-6 for a in out["attribution"])
    ws.consumers_path.write_text("consumers:\n  open: {licenses: [cc-by]}\n  bobs: {owners: [bob]}\n")
    png = ws.root / "outputs" / "c.png"
    assert cli(["sample", "--workspace", str(ws.root), "--n", "4", "--consumer", "open", "--json", "--out", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert png.is_file() and doc["n"] == 4
    assert all(set(k for k, v in s["attribution"].items() if v > 0) <= {"alice", "bob"} for s in doc["samples"])
    assert cli(["sample", "--workspace", str(ws.root), "--n", "3", "--consumer", "bobs", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(s["attribution"]["alice"] == 0.0 and abs(s["attribution"]["bob"] - 1) < 1e-6 for s in doc["samples"])
    assert cli(["sample", "--workspace", str(ws.root), "--n", "2", "--consumer", "nobody"]) == 2
    assert cli(["sample", "--workspace", str(ws.root), "--n", "0"]) == 2
    assert cli(["sample", "--workspace", str(ws.root), "--n", "2", "--label", "42"]) == 2


def test_revocation_certificate(story):
    cert = story["certificate"]
    assert cert["requested_by"] == "owner" and cert["owner_key"] == story["carol_key"]
    assert cert["shards_dropped"] == [] and len(cert["shards_retrained"]) == 1
    retrain = next(iter(cert["retraining"].values()))
    assert retrain["resumed_from_slice"] == 0 and retrain["steps_run"] == 20  # carol's data came in slice 1
    assert cert["verification"]["ok"], cert["verification"]
    assert cert["composite_after"] != cert["composite_before"]
    assert "carol" not in json.dumps(cert)


def test_purge_leaves_nothing_in_mlflow_artifacts_dvc_or_remote(story, s3):
    ws, key = story["ws"], story["carol_key"]
    db = sqlite3.connect(ws.tracking_uri.removeprefix("sqlite:///"))
    tag_values = [v for (v,) in db.execute("select value from model_version_tags union all "
                                           "select value from registered_model_tags")]
    assert not [v for v in tag_values if key in v]
    runs = {r for (r,) in db.execute("select run_uuid from runs")}
    purged_runs = {run for _, _, run in story["carol_versions"]}
    assert purged_runs and not purged_runs & runs
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])]
    assert not [k for k in keys if any(f"/{r}/" in k for r in purged_runs)]
    listing = dvc.list_objects(ws.root, s3_client=s3)
    assert not story["carol_md5"] & listing["cache"] and not story["carol_md5"] & listing["remote"]
    assert not (ws.owners_dir / "carol").exists()
    # Nothing that is still registered references a deleted model version.
    c = registry.client(ws.tracking_uri)
    for mv in registry.versions(c, registry.COMPOSITE):
        for sid, v in json.loads(mv.tags["cdm.components"]).items():
            c.get_model_version(registry.SHARD_PREFIX + sid, v)


def test_revoking_twice_or_unknown_owner_is_refused(story):
    ws = story["ws"]
    assert cli(["revoke", "carol", "--workspace", str(ws.root)]) == 2
    assert cli(["revoke", "zed", "--workspace", str(ws.root)]) == 2
    assert cli(["revoke", "bob", "--workspace", str(ws.root), "--token", "not-bobs"]) == 2
    assert cli(["revoke", "../etc", "--workspace", str(ws.root)]) == 2
    assert "bob" in ws.owners()


def test_evaluation_writes_metrics_and_fails_on_regression(story, capsys):
    ws = story["ws"]
    out = ws.root / "metrics.json"
    assert cli(["evaluate", "--workspace", str(ws.root), "--json", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["fid"] > 0 and len(metrics["feature_sha256"]) == 64
    assert metrics["membership_auc"] == {story["carol_key"]: story["certificate"]["forgetting"]["auc_after"]}
    assert set(metrics["attribution"]) == {"alice", "bob"}
    capsys.readouterr()
    params = ws.params_path.read_text()
    try:
        p = Params.load(ws.params_path)
        p.evaluate.fid_max = 1e-6
        p.dump(ws.params_path)
        assert cli(["evaluate", "--workspace", str(ws.root), "--json", "--fail-on-regression"]) == 1
        assert "regression" in json.loads(capsys.readouterr().out)["error"]
    finally:
        ws.params_path.write_text(params)


def test_status_lists_state_and_detects_a_tampered_ledger(story, capsys):
    ws = story["ws"]
    assert cli(["status", "--workspace", str(ws.root), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    states = {o["id"]: o["state"] for o in status["owners"]}
    assert states == {"alice": "active", "bob": "active", story["carol_key"]: "revoked"}
    assert status["production"]["shards"] and status["ledger"] == {"ok": True, "entries": 1, "problem": None}
    original = ws.ledger_path.read_text()
    try:
        ws.ledger_path.write_text(original.replace('"requested_by": "owner"', '"requested_by": "operator"'))
        assert not ledger.verify(ws.ledger_path).ok
        assert cli(["status", "--workspace", str(ws.root)]) == 1
    finally:
        ws.ledger_path.write_text(original)


def test_dvc_repro_runs_the_evaluation_stage(story):
    ws = story["ws"]
    env = {**__import__("os").environ, "PATH": f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws.root, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((ws.root / "metrics.json").read_text())["fid"] > 0


def test_malformed_or_missing_configuration_exits_2_and_changes_nothing(story, capsys):
    ws = story["ws"]
    params, consumers = ws.params_path.read_text(), ws.consumers_path.read_text()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True).stdout
    try:
        ws.params_path.write_text("train: [unclosed\n")
        assert cli(["train", "--workspace", str(ws.root)]) == 2
        assert "not valid YAML" in capsys.readouterr().err
        ws.params_path.write_text("compose:\n  estimator: magic\n")
        assert cli(["compose", "--workspace", str(ws.root)]) == 2
        assert "compose.estimator" in capsys.readouterr().err
        ws.params_path.unlink()
        assert cli(["compose", "--workspace", str(ws.root)]) == 2
        assert "params.yaml" in capsys.readouterr().err
        ws.params_path.write_text(params)
        ws.consumers_path.write_text("consumers: 3\n")
        assert cli(["sample", "--n", "2", "--consumer", "open", "--workspace", str(ws.root)]) == 2
        assert "consumers" in capsys.readouterr().err
    finally:
        ws.params_path.write_text(params)
        ws.consumers_path.write_text(consumers)
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True).stdout == head
