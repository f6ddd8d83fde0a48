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
from cdm.platform import registry
from cdm.platform.context import Context
from cdm.platform.create import init_workspace
from cdm.platform.errors import WorkspaceError
from flows.cli import main as cli

# ~35 s of training: in `make test-slow`, beside the other end-to-end runs.
pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_pretrain_refuses_owner_data_and_shards_start_from_the_registered_init(tmp_path, small_params,
                                                                             digit_owners):
    from cdm.platform.ingest import ingest
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
    from cdm.platform.evaluate import heldout, unseen

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
