"""The pipeline end to end with real components: a moto S3 server on loopback (owner source, DVC remote, MLflow
artifacts), MLflow on SQLite, real DVC and git commands, Prefect flows and deployments under the test harness.

Story: alice (from S3), bob and carol (folders; small, so they share a shard) are ingested; a bad batch is
rejected; carol's cron ingestion deployment is applied; shards and paragon are trained; a composite goes live and
is evaluated; dave arrives and is left untrained; an ingestion of "carolyn" is interrupted; carol revokes with her
token through the CLI.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdm.config import Params
from cdm.platform.data import dvc
from cdm.platform.workspace import ledger, owner_records
from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.platform.create import init_workspace
from cdm.platform.workspace.errors import OwnerRevoked
from cdm.platform.data.ingest import IngestionRejected
from cdm.platform.forgetting.record import all_revocations
from flows.cli import main as cli

pytestmark = pytest.mark.usefixtures("prefect_harness")


def upload(s3, folder: Path, bucket: str, prefix: str) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(folder).as_posix()}", Body=f.read_bytes())


@pytest.fixture(scope="module")
def story(tmp_path_factory, s3, s3_server, small_params, digit_owners, workspace_snapshot, interrupted_ingestion):
    from flows.composition import compose
    from flows.deployments import deployments
    from flows.ingestion import ingest
    from flows.training import run_training

    tmp = tmp_path_factory.mktemp("pipeline")
    for bucket in ("owners", "dvc", "mlflow"):
        s3.create_bucket(Bucket=bucket)
    sources = digit_owners(tmp / "sources")
    upload(s3, sources["alice"], "owners", "alice")
    ws = init_workspace(tmp / "ws", remote="s3://dvc/store", endpoint_url=s3_server,
                        artifact_root="s3://mlflow/artifacts", params=small_params())
    ctx = Context.load(ws.root)
    out = {"ws": ws, "ctx": ctx, "sources": sources}
    out["ingest"] = {"alice": ingest(ctx, "alice", "s3://owners/alice"),
                     "bob": ingest(ctx, "bob", str(sources["bob"]), "cc-by")}
    # A bad batch: one truncated PNG among good files.
    bad = tmp / "bad-dave"
    shutil.copytree(sources["dave"], bad)
    victim = sorted(bad.glob("*/*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:30])
    out["before_bad"] = workspace_snapshot(ws, s3)
    with pytest.raises(IngestionRejected) as rejected:
        ingest(ctx, "dave", str(bad))
    out["rejected"] = rejected.value
    out["after_bad"] = workspace_snapshot(ws, s3)
    out["ingest"]["carol"] = ingest(ctx, "carol", str(sources["carol"]), "proprietary", cron="*/5 * * * *")
    out["carol_key"] = ws.owner_key("carol")
    # carol's scheduled ingestion, as `cdm serve` registers it.
    (carol_deployment,) = [d for d in deployments(str(ws.root)) if d.name == f"ingest-{out['carol_key']}"]
    out["carol_deployment"] = {"id": carol_deployment.apply(), "parameters": carol_deployment.parameters}
    out["train"] = run_training(ctx, paragon=True)
    out["train_again"] = run_training(ctx)
    out["compose"] = compose(str(ws.root))
    assert cli(["evaluate", "--workspace", str(ws.root), "--json", "--out", str(ws.root / "metrics.json")]) == 0
    # dave arrives after composition; only alice's shard is retrained (`train --owners`): dave's shard has no
    # version when carol revokes.
    out["ingest"]["dave"] = ingest(ctx, "dave", str(sources["dave"]))
    assert cli(["train", "--owners", "alice", "--workspace", str(ws.root)]) == 0
    # An ingestion of "carolyn" interrupted before its commit (kill -9): revoking "carol" must not touch it.
    out["carolyn"] = interrupted_ingestion(ctx, "carolyn", tmp / "carolyn-src", (sources["bob"] / "4").glob("*.png")
                                           .__next__().read_bytes())
    c = registry.client(ctx.tracking_uri)
    out["carol_versions"] = [(mv.name, mv.version, mv.run_id) for m in c.search_registered_models()
                             for mv in registry.versions(c, m.name)
                             if out["carol_key"] in mv.tags.get("cdm.owner_keys", "")]
    out["carol_md5"] = {dvc.md5_bytes(p.read_bytes()) for p in ws.owner_dir("carol").rglob("*.png")}
    out["production_before"] = registry.alias_version(c, registry.COMPOSITE).version
    token = out["ingest"]["carol"]["token"]
    out["revoke_exit"] = cli(["revoke", "carol", "--reason", "test", "--token", token, "--wait", "--workspace",
                              str(ws.root)])
    (rev,) = [r for r in all_revocations(ws) if r.owner_key == out["carol_key"]]
    out["certificate"] = rev.certify
    return out


def test_ingestion_reads_s3_and_pushes_to_the_s3_remote(story, s3):
    ws = story["ws"]
    assert ws.manifest("alice")["license"] == "cc-by" and len(ws.manifest("alice")["samples"]) == 200
    md5s = {dvc.md5_bytes(p.read_bytes()) for p in ws.owner_dir("alice").rglob("*.png")}
    assert md5s <= dvc.list_objects(ws.root, s3_client=s3)["remote"]
    assert story["ingest"]["alice"]["token"] and story["ingest"]["bob"]["data_hash"].endswith(".dir")
    rec = owner_records.record(ws, ws.owner_key("bob"))
    assert rec.source == str(story["sources"]["bob"].resolve()) and Path(rec.source).is_absolute()


def test_rejected_batch_names_the_file_and_changes_nothing(story):
    problems = story["rejected"].report.problems
    assert len(problems) == 1 and "does not decode" in problems[0].reason
    assert story["before_bad"] == story["after_bad"]
    assert not [f for f in story["after_bad"]["files"] if "dave" in f]
    assert Path(story["rejected"].report.docs).is_file()  # Data Docs kept, named by key
    assert story["ws"].owner_key("dave") in story["rejected"].report.docs


def test_shard_versions_carry_provenance_without_raw_owner_ids(story):
    ws, ctx = story["ws"], story["ctx"]
    c = ctx.client
    mv = registry.latest(c, registry.SHARD_PREFIX + next(s for s, o in json.loads(
        (ws.state_dir / "shards.json").read_text()).items() if o == ["alice"]))
    for tag in ("cdm.owner_keys", "cdm.manifest_sha256", "cdm.dvc_data_hash", "cdm.samples", "cdm.class_counts",
                "cdm.config_hash", "cdm.code_version", "cdm.slice_keys", "cdm.weights_sha256"):
        assert mv.tags.get(tag), tag
    assert json.loads(mv.tags["cdm.owner_keys"]) == [ws.owner_key("alice")]
    run = c.get_run(mv.run_id)
    assert set(run.data.metrics) >= {"train_loss", "train_seconds"} and "loss" not in run.data.metrics
    assert run.info.end_time - run.info.start_time >= 1000 * run.data.metrics["train_seconds"]  # the run wraps it
    values = json.dumps([mv.tags, run.data.params, run.data.tags])
    for owner in ("alice", "bob", "carol"):
        assert not re.search(rf"\b{owner}\b", values)


def test_training_plan_groups_small_owners_and_skips_unchanged(story):
    shards = story["train"]["shards"]
    assert len(shards) == 2 and story["train"]["paragon"]["version"] == "1"
    assert all(r["skipped"] for r in story["train_again"]["shards"].values())


def test_composite_serves_attribution_and_respects_consumer_rights(story, capsys):
    import mlflow

    ws = story["ws"]
    story["ctx"].client  # the workspace's tracking URI
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


def prefect_artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def flow_run_name(flow_run_id) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).name


def test_revocation_certificate(story):
    assert story["revoke_exit"] == 0
    cert = story["certificate"]
    assert cert["requested_by"] == "owner" and cert["owner_key"] == story["carol_key"]
    assert cert["shards_dropped"] == [] and len(cert["shards_retrained"]) == 1
    retrain = next(iter(cert["retraining"].values()))
    assert retrain["resumed_from_slice"] == 0 and retrain["steps_run"] == 20  # carol's data came in slice 1
    v = cert["verification"]
    assert v["ok"] and v["pixel_search"], v
    assert set(v["scan"]["scanned"]) >= {"workspace files", "git objects", "DVC cache", "DVC remote", "MLflow backend",
                                         "MLflow artifacts", "Prefect database", "owner record"}
    assert all(n > 0 for store, n in v["scan"]["scanned"].items() if store != "owner record"), v["scan"]["scanned"]
    assert cert["composite_after"] != cert["composite_before"]
    f = cert["forgetting"]
    assert f["verdict"].startswith("inconclusive"), f  # 40-step shards: the attack has no power, and the record says so
    assert not re.search(r"\bcarol\b", json.dumps(cert))
    assert cert["ledger"]["seq"] == 0
    # Where operators look: the certificate on the flow run, in the Prefect UI (owner key only).
    (artifact,) = [a for a in prefect_artifacts("cdm-revocation") if cert["request_id"] in a.data]
    assert "**verified**" in artifact.data and "| DVC remote |" in artifact.data
    assert story["carol_key"] in artifact.data and not re.search(r"\bcarol\b", artifact.data)
    assert flow_run_name(artifact.flow_run_id) == f"unlearn-{story['carol_key']}"


def test_going_live_keeps_production_when_a_planned_shard_was_never_trained(story):
    """Bug: `train --owners` left dave's planned shard untrained; going live used to fail on it and delete the
    production alias. Now production is the previous composite minus carol's shard; dave's shard waits."""
    ctx = story["ctx"]
    cert = story["certificate"]
    prod = registry.alias_version(ctx.client, registry.COMPOSITE)
    assert prod is not None and str(prod.version) == cert["composite_after"]
    components = json.loads(prod.tags["cdm.components"])
    plan = json.loads((story["ws"].state_dir / "shards.json").read_text())
    dave_shard = next(s for s, o in plan.items() if o == ["dave"])
    assert registry.latest(ctx.client, registry.SHARD_PREFIX + dave_shard) is None and dave_shard not in components
    assert len(components) == 2


def test_revoking_carol_left_carolyns_interrupted_ingestion_recovered_not_deleted(story):
    """Bug: the purge cleaned staging with glob('*carol*') outside the lock, deleting carolyn's journal and backup
    and leaving her half-committed folder. Now the purge undoes interrupted ingestions under the lock first."""
    ws = story["ws"]
    assert not (ws.owners_dir / "carolyn").exists()
    assert not list(ws.staging_dir.glob("*")) if ws.staging_dir.exists() else True
    carolyn_md5 = {dvc.md5_bytes(d) for d in story["carolyn"][1]} - {dvc.md5_bytes(p.read_bytes())
                                                                      for p in ws.owners_dir.rglob("*.png")}
    listing = dvc.list_objects(ws.root, s3_client=story["ctx"].s3())
    assert not carolyn_md5 & listing["cache"]


def test_purge_leaves_nothing_in_mlflow_artifacts_dvc_or_remote(story, s3):
    ws, key, ctx = story["ws"], story["carol_key"], story["ctx"]
    c = ctx.client
    assert registry.versions_tagged(c, key) == []
    purged_runs = {run for _, _, run in story["carol_versions"]}
    assert purged_runs and not [r for r in purged_runs if registry.run_exists(c, r)]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])]
    assert not [k for k in keys if any(f"/{r}/" in k for r in purged_runs)]
    listing = dvc.list_objects(ws.root, s3_client=s3)
    assert not story["carol_md5"] & listing["cache"] and not story["carol_md5"] & listing["remote"]
    assert not (ws.owners_dir / "carol").exists()
    # Nothing that is still registered references a deleted model version.
    for mv in registry.versions(c, registry.COMPOSITE):
        for sid, v in json.loads(mv.tags["cdm.components"]).items():
            c.get_model_version(registry.SHARD_PREFIX + sid, v)


def prefect_db_file() -> Path:
    """The test harness's Prefect database (the API the story's flows ran on)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    db = Path(str(url.get_secret_value() if hasattr(url, "get_secret_value") else url).split(":///", 1)[1])
    assert db.is_file()
    return db


def test_a_byte_scan_of_every_store_finds_the_raw_id_once_and_the_token_nowhere(story, s3):
    """After `cdm evaluate` and a token-authenticated revocation: the workspace's files and every git object, the
    DVC remote, the MLflow store (SQLite + S3 artifacts) and the Prefect database, read byte by byte."""
    ws, token = story["ws"], story["ingest"]["carol"]["token"].encode()
    raw = re.compile(rb"(?<![a-z0-9_-])carol")  # no right boundary: database columns sit side by side
    blobs: dict[str, bytes] = {}
    for p in ws.root.rglob("*"):
        if p.is_file():
            blobs[str(p.relative_to(ws.root))] = p.read_bytes()
    objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=ws.root,
                             capture_output=True, check=True).stdout
    blobs["<every git object>"] = objects
    for bucket in ("dvc", "mlflow"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                blobs[f"s3://{bucket}/{o['Key']}"] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    db = prefect_db_file()
    for p in db.parent.glob(db.name + "*"):
        blobs[f"prefect:{p.name}"] = p.read_bytes()
    assert len(blobs) > 100
    with_raw = sorted(name for name, data in blobs.items() if raw.search(data) or raw.search(name.encode()))
    assert with_raw == [".cdm/owners.json"], with_raw
    assert not [name for name, data in blobs.items() if token in data]
    rec = owner_records.record(ws, story["carol_key"])
    assert rec.state == "revoked" and rec.owner == "carol" and rec.token_public_key is None and rec.source is None


def test_the_schedule_is_removed_and_a_scheduled_run_is_refused(story, workspace_snapshot, s3, capsys):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.ingestion import ingest_owner

    ws = story["ws"]
    with get_client(sync_client=True) as client:
        with pytest.raises(ObjectNotFound):
            client.read_deployment(story["carol_deployment"]["id"])
    before = workspace_snapshot(ws, s3)
    # What a runner would execute if a run of the old schedule fired: refused, nothing ingested.
    with pytest.raises(OwnerRevoked, match="revoked consent"):
        ingest_owner(**story["carol_deployment"]["parameters"])
    assert workspace_snapshot(ws, s3) == before and not (ws.owners_dir / "carol").exists()
    capsys.readouterr()
    assert cli(["ingest", "carol", str(story["sources"]["carol"]), "--workspace", str(ws.root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "revoked consent" in err[0] and "cdm consent" in err[0]
    assert cli(["status", "--workspace", str(ws.root), "--json"]) == 0
    states = {o["id"]: o["state"] for o in json.loads(capsys.readouterr().out)["owners"]}
    assert states[story["carol_key"]] == "revoked"


REFUSALS = {
    "unknown owner": ["revoke", "zed"],
    "revoked twice": ["revoke", "carol"],
    "another owner's token": ["revoke", "bob", "--token", "not-bobs"],
    "unsafe owner id": ["revoke", "../etc"],
    "label out of the set": ["sample", "--n", "2", "--label", "42"],
    "label no remaining owner holds": ["sample", "--n", "2", "--label", "8"],
    "zero samples": ["sample", "--n", "0"],
    "unknown consumer": ["sample", "--n", "2", "--consumer", "nobody"],
    "revoked owner ingested": ["ingest", "carol", "{carol_src}"],
    "missing source folder": ["ingest", "erin", "{missing}"],
    "bad batch": ["ingest", "erin", "{bad}"],
    "new owner id too short to search for": ["ingest", "ed", "{carol_src}"],
    "consent of an active owner": ["consent", "bob"],
    "unknown owner to train": ["train", "--owners", "zed"],
    "missing argument": ["revoke"],
    "unknown option": ["status", "--frobnicate"],
    "not a workspace": ["status", "--workspace", "{nowhere}"],
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_every_refusal_prints_exactly_one_stderr_line(story, case, capsys, tmp_path):
    ws = story["ws"]
    bad = tmp_path / "bad"
    (bad / "3").mkdir(parents=True)
    (bad / "3" / "x.png").write_bytes(b"not a png")
    values = {"carol_src": str(story["sources"]["carol"]), "missing": str(tmp_path / "missing"), "bad": str(bad),
              "nowhere": str(tmp_path)}
    args = [a.format(**values) for a in REFUSALS[case]]
    if "--workspace" not in args:
        args += ["--workspace", str(ws.root)]
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("cdm"), err
    assert "bob" in ws.owners() and owner_records.record_of(ws, "erin")[1] is None
    assert owner_records.record_of(ws, "ed")[1] is None


def test_the_log_never_carries_a_raw_id_not_even_a_refused_one(story, capsys):
    """Bug: a second `cdm revoke carol` after completion wrote "owner 'carol' was already revoked" into the log."""
    ws = story["ws"]
    assert cli(["revoke", "carol", "--workspace", str(ws.root)]) == 2
    assert "carol" in capsys.readouterr().err  # the person who typed it is told, on stderr
    log = (ws.state_dir / "logs" / "cdm.log").read_text()
    assert "failed (exit 2)" in log and not re.search(r"(?<![a-z0-9_-])carol(?![a-z0-9])", log, re.I)


def test_a_refusal_in_a_real_process_is_one_line_too(story):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "revoke", "zed", "--workspace", str(story["ws"].root)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == "cdm revoke: unknown owner 'zed'", proc.stderr


def test_evaluation_writes_metrics_and_fails_on_regression(story, capsys):
    ws = story["ws"]
    out = ws.root / "metrics.json"
    assert cli(["evaluate", "--workspace", str(ws.root), "--json", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["fid"] > 0 and len(metrics["feature_sha256"]) == 64 and "kid" not in metrics
    mem = metrics["memorization_check"]  # its positive control (planted near-copies) fired on these digits
    assert mem["fired"] and mem["low"] <= mem["share"] <= mem["high"]
    assert metrics["verdicts"]["memorization"].split()[0] in ("met", "inconclusive", "failed")
    assert metrics["fid_ci"][0] <= metrics["fid"] <= metrics["fid_ci"][1] and metrics["floor_real"]["mean"] > 0
    assert metrics["labels"] == "class-conditional, stratified" and metrics["sets"] == 2
    nll = metrics["nll"]
    assert nll["composite_bpd"]["low"] <= nll["composite_bpd"]["mean"] <= nll["composite_bpd"]["high"]
    assert len(nll["shards_bpd"]) == 2 and nll["images"] > 100
    assert metrics["paragon_version"] is None and "gap_bpd" not in nll  # carol's paragon was purged
    assert metrics["membership_auc"] == {story["carol_key"]: story["certificate"]["forgetting"]["auc_after"]}
    assert set(metrics["attribution"]) <= {ws.owner_key(o) for o in ("alice", "bob")}
    evaluations = prefect_artifacts("cdm-evaluation")  # one per evaluation, on its flow run
    assert len(evaluations) >= 2 and all(a.flow_run_id for a in evaluations)
    latest = max(evaluations, key=lambda a: a.created)
    assert f"composite v{metrics['composite_version']}" in latest.data and f"{metrics['fid']:.2f}" in latest.data
    # The registry says what each composite version changed (the first ones used carol's shard: purged).
    c = registry.client(ws.tracking_uri())
    descriptions = [mv.description for mv in registry.versions(c, registry.COMPOSITE)]
    assert all(descriptions) and any("dropped" in d and f"revocations applied: {story['certificate']['request_id']}"
                                     in d for d in descriptions), descriptions
    capsys.readouterr()
    params = ws.params_path.read_text()
    try:
        p = Params.load(ws.params_path)
        # Thresholds no measurement can meet (an FID threshold would need the interval, which 2 sets leave wide).
        p.evaluate.membership_auc_max, p.evaluate.memorization_max = -1.0, -1.0
        p.dump(ws.params_path)
        assert cli(["evaluate", "--workspace", str(ws.root), "--fail-on-regression"]) == 1
        captured = capsys.readouterr()
        assert "2 regression(s)" in captured.err and "membership AUC" in captured.err and "memorization" in captured.out
        assert "KID" not in captured.out and "memorization: failed (goal <= -1.0" in captured.out
        assert "noise floor at the same N" in captured.out and "NLL bound" in captured.out
    finally:
        ws.params_path.write_text(params)


def test_status_lists_state_and_detects_a_tampered_ledger(story, capsys):
    ws = story["ws"]
    assert cli(["status", "--workspace", str(ws.root), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    states = {o["id"]: o["state"] for o in status["owners"]}
    assert states == {"alice": "active", "bob": "active", "dave": "active", story["carol_key"]: "revoked"}
    assert status["production"]["shards"] and status["ledger"]["ok"] and status["ledger"]["entries"] == 1
    assert status["revocations_in_progress"] == []
    original = ws.ledger_path.read_text()
    try:
        ws.ledger_path.write_text(original.replace('"requested_by": "owner"', '"requested_by": "operator"'))
        assert not ledger.verify(ws.ledger_path, ws.secret()).ok
        assert cli(["status", "--workspace", str(ws.root)]) == 1
        ws.ledger_path.write_text("")  # removed entirely: the anchor on the registry still says 1 entry
        assert cli(["status", "--workspace", str(ws.root)]) == 1
        assert "anchored head" in capsys.readouterr().err
    finally:
        ws.ledger_path.write_text(original)


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


def test_verification_catches_a_trace_planted_in_each_store(story, s3):
    """A made-up owner's raw id, sample hash and token planted in every store: the scan names each store."""
    from cdm.platform.forgetting.scan import Needles, scan
    from cdm.platform.forgetting.stores import workspace_stores
    from prefect.client.orchestration import get_client

    ws, ctx = story["ws"], story["ctx"]
    sample_sha = "ab" * 32
    plant = b"owner zelda " + sample_sha.encode()
    (ws.root / "outputs").mkdir(exist_ok=True)
    (ws.root / "outputs" / "note.txt").write_bytes(plant)  # workspace files
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=ws.root, input=b"zelda was here",
                          capture_output=True, check=True).stdout  # git objects (unreachable, still stored)
    assert blob
    cache_obj = ws.root / ".dvc" / "cache" / "files" / "md5" / "ff" / ("0" * 30)
    cache_obj.parent.mkdir(parents=True, exist_ok=True)
    cache_obj.write_bytes(plant)  # DVC cache
    s3.put_object(Bucket="dvc", Key="store/files/md5/ff/" + "1" * 30, Body=plant)  # DVC remote
    run = ctx.client.create_run(ctx.experiment_id, run_name="run of zelda")  # MLflow backend
    s3.put_object(Bucket="mlflow", Key="artifacts/planted/zelda.txt", Body=b"zelda")  # MLflow artifacts
    with get_client(sync_client=True) as client:  # the Prefect database
        flow_id = client.create_flow_from_name("flow of zelda")
    assert flow_id
    needles = Needles("zelda", {sample_sha: "sample sha256", "tok-zelda": "token"}, {})
    db = prefect_db_file()
    report = scan(workspace_stores(ctx, prefect_db=db), needles)
    stores = {f.store for f in report.findings}
    assert stores >= {"workspace files", "git objects", "DVC cache", "DVC remote", "MLflow backend",
                      "MLflow artifacts", "Prefect database"}, report.as_dict()
    assert not report.ok
    ctx.client.delete_run(run.info.run_id)


def test_a_new_consent_lets_a_revoked_owner_in_again(story, capsys):
    """Last in the module: carol consents again (ledger entry, new token), and her ingestion is accepted."""
    ws = story["ws"]
    capsys.readouterr()
    assert cli(["consent", "carol", "--workspace", str(ws.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["token"] and doc["token"] != story["ingest"]["carol"]["token"] and doc["ledger_seq"] == 1
    assert cli(["consent", "carol", "--workspace", str(ws.root)]) == 2  # not revoked any more
    assert cli(["ingest", "carol", str(story["sources"]["carol"]), "--workspace", str(ws.root)]) == 0
    assert "carol" in ws.owners() and owner_records.record(ws, story["carol_key"]).state == "active"
    capsys.readouterr()
    assert cli(["status", "--workspace", str(ws.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ledger"]["entries"] == 2


def test_changing_an_owners_source_needs_their_token_or_the_operator(story, capsys, monkeypatch, tmp_path):
    """Whoever re-points an owner's source feeds the workspace data in their name: the owner's token or an operator
    who says so (in the ledger); a refusal changes nothing."""
    ws = story["ws"]
    key = ws.owner_key("bob")
    recorded = owner_records.record(ws, key).source
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(story["sources"]["bob"], elsewhere)
    entries = len(ledger.read(ws.ledger_path))
    monkeypatch.delenv("CDM_OWNER_TOKEN", raising=False)
    capsys.readouterr()
    assert cli(["ingest", "bob", str(elsewhere), "--workspace", str(ws.root)]) == 2
    assert "needs the owner's token" in capsys.readouterr().err
    monkeypatch.setenv("CDM_OWNER_TOKEN", story["ingest"]["alice"]["token"])  # another owner's token
    assert cli(["ingest", "bob", str(elsewhere), "--workspace", str(ws.root)]) == 2
    assert owner_records.record(ws, key).source == recorded and len(ledger.read(ws.ledger_path)) == entries
    monkeypatch.setenv("CDM_OWNER_TOKEN", story["ingest"]["bob"]["token"])
    assert cli(["ingest", "bob", str(elsewhere), "--workspace", str(ws.root)]) == 0
    assert owner_records.record(ws, key).source == str(elsewhere.resolve())
    monkeypatch.delenv("CDM_OWNER_TOKEN")
    assert cli(["ingest", "bob", recorded, "--operator", "--workspace", str(ws.root)]) == 0  # and back
    assert owner_records.record(ws, key).source == recorded
    changes = [e for e in ledger.read(ws.ledger_path)[entries:] if e["event"] == "source-changed"]
    assert [(e["owner_key"], e["by"]) for e in changes] == [(key, "owner"), (key, "operator")]
    assert "bob" not in json.dumps(changes)
