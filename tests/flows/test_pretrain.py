"""The shared initialization through the pipeline: `cdm pretrain` on public data (refused if it holds an owner's
sample), registered as cdm-init with its provenance; with `train.init: public` shards start from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from cdm.config import Params
from cdm.data import digits_uint8, heldout_split, write_class_folders
from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.platform.create import init_workspace
from cdm.platform.workspace.errors import WorkspaceError
from flows.cli import main as cli

# ~35 s of training: in `make test-slow`, beside the other end-to-end runs.
pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_pretrain_refuses_owner_data_and_shards_start_from_the_registered_init(tmp_path, small_params,
                                                                             digit_owners):
    from cdm.platform.data.ingest import ingest
    from flows.training import pretrain, run_training

    p = small_params()
    p.train.init_steps = 30
    ws = init_workspace(tmp_path / "ws", params=p)
    sources = digit_owners(tmp_path / "sources")
    ingest(Context.load(ws.root), "bob", str(sources["bob"]))
    images, labels = digits_uint8()
    _, held = heldout_split(labels)  # public: the held-out split, which belongs to no owner
    public = tmp_path / "public"
    write_class_folders(images[held[:80]], labels[held[:80]], public)
    bobs = {f.name for f in sources["bob"].rglob("*.png")}  # files are named by content hash
    for f in public.rglob("*.png"):
        if f.name in bobs:  # the test owners are drawn from all digits: keep the public set disjoint
            f.unlink()
    n_public = sum(1 for _ in public.rglob("*.png"))
    leak = next(sources["bob"].rglob("*.png"))
    (public / leak.parent.name).mkdir(exist_ok=True)
    shutil.copy(leak, public / leak.parent.name / "leak.png")
    with pytest.raises(WorkspaceError, match="also held by an owner"):
        pretrain(str(ws.root), str(public))
    (public / leak.parent.name / "leak.png").unlink()
    assert cli(["pretrain", str(public), "--workspace", str(ws.root), "--steps", "0"]) == 2

    p.train.init = "public"
    p.dump(ws.params_path)
    with pytest.raises(WorkspaceError, match="cdm pretrain"):
        run_training(Context.load(ws.root))
    info = pretrain(str(ws.root), str(public))
    assert info["samples"] == n_public and info["steps"] == 30

    c = registry.client(ws.tracking_uri())
    init = registry.alias_version(c, registry.INIT, registry.CURRENT)
    assert init.tags["cdm.public"] == "true" and init.tags["cdm.source"] == str(public)
    manifest = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=init.run_id,
                                                                   artifact_path="public_manifest.json")).read_text())
    assert len(manifest) == n_public and {m["label"] for m in manifest} <= set(range(10))
    # The evaluation's "unseen" data leaves out every public image the initialization was trained on.
    from cdm.platform.evaluation.evaluate import heldout, unseen

    left = unseen(Context.load(ws.root))
    assert not set(left.ids) & {m["sha256"] for m in manifest}
    assert len(left) <= len(heldout(p)) - n_public

    result = run_training(Context.load(ws.root))
    (sid, shard), = result["shards"].items()
    mv = registry.latest(c, registry.SHARD_PREFIX + sid)
    assert mv.tags["cdm.init"] == f"cdm-init v{info['version']} (public data)"
    train_params = json.loads(c.get_run(mv.run_id).data.params["train"])
    assert train_params["init_sha256"] == info["state_sha256"] == init.tags["cdm.state_sha256"]
    # A new shared initialization changes the config hash: the shard is trained again, not skipped.
    pretrain(str(ws.root), str(public), steps=10)
    again = run_training(Context.load(ws.root))
    assert not again["shards"][sid]["skipped"]
    assert Params.load(ws.params_path).train.init == "public"


def test_lora_compartments_register_adapters_alone_and_a_revocation_never_touches_the_base(
        tmp_path, small_params, digit_owners, monkeypatch):
    from cdm.platform.models.composites import load_production
    from cdm.platform.models.weights import ADAPTER_ARTIFACT, UNET_ARTIFACT
    from flows.ingestion import ingest
    from flows.training import pretrain

    p = small_params()
    p.train.init_steps, p.train.init, p.train.compartment, p.train.lora_rank = 30, "public", "lora", 4
    p.train.min_shard_samples = 0
    ws = init_workspace(tmp_path / "ws", params=p)
    sources = digit_owners(tmp_path / "sources")
    tokens = {o: ingest(Context.load(ws.root), o, str(sources[o]))["token"] for o in ("alice", "bob")}
    images, labels = digits_uint8()
    _, held = heldout_split(labels)
    owned = {f.name for o in ("alice", "bob") for f in sources[o].rglob("*.png")}
    public = tmp_path / "public"
    write_class_folders(images[held[:80]], labels[held[:80]], public)
    for f in public.rglob("*.png"):
        if f.name in owned:
            f.unlink()
    base = pretrain(str(ws.root), str(public))
    assert cli(["train", "--workspace", str(ws.root)]) == 0
    assert cli(["compose", "--workspace", str(ws.root)]) == 0

    c = registry.client(ws.tracking_uri())
    init_before = c.get_model_version(registry.INIT, base["version"])
    shards = {mv.name: mv for mv in registry.all_versions(c) if mv.name.startswith(registry.SHARD_PREFIX)}
    assert len(shards) == 2 and all(mv.tags["cdm.compartment"] == "lora" for mv in shards.values())
    for mv in shards.values():  # adapter-only artifacts that name their base
        assert mv.tags["cdm.base"] == f"{registry.INIT}/{base['version']}"
        with registry.model_files(c, mv.name, str(mv.version), ws.tmp_dir) as files:
            assert (files / ADAPTER_ARTIFACT).is_dir() and not (files / UNET_ARTIFACT).exists()
            assert sum(f.stat().st_size for f in (files / ADAPTER_ARTIFACT).rglob("*")) < int(
                mv.tags["cdm.adapter_bytes"]) + 16384  # + the safetensors header and the config
    with load_production(Context.load(ws.root)) as model:
        out = model.predict({"n": 2, "seed": 0})
    assert out["images"].shape == (2, 1, 8, 8) and len(out["shards"]) == 2

    monkeypatch.setenv("CDM_OWNER_TOKEN", tokens["alice"])
    assert cli(["revoke", "alice", "--wait", "--workspace", str(ws.root)]) == 0
    key = ws.owner_key("alice")
    left = [mv for mv in registry.all_versions(c) if mv.name.startswith(registry.SHARD_PREFIX)]
    assert all(key not in json.loads(mv.tags["cdm.owner_keys"]) for mv in left) and len(left) == 1
    init_after = c.get_model_version(registry.INIT, base["version"])  # the base is untouched
    assert init_after.tags["cdm.weights_sha256"] == init_before.tags["cdm.weights_sha256"]
    from cdm.platform.forgetting.record import all_revocations

    cert = all_revocations(ws)[0].certify
    assert cert["verification"]["ok"] and cert["shared_base"]["version"] == base["version"]
    assert cert["shared_base"]["public_manifest_sha256"] == init_before.tags["cdm.public_manifest_sha256"]
    assert cert["shared_base"]["weights_sha256"] == init_before.tags["cdm.weights_sha256"]  # hashed after the purge
    assert cert["shared_base"]["touched"] is False
