"""Bringing your own base: `cdm pretrain --from DIR --trained-on TEXT` (no training, so it runs in `make test`)."""

from __future__ import annotations

import json
from dataclasses import replace

from cdm.config import model_config
from cdm.model import build_unet, load_unet, save_unet
from cdm.platform.models import registry
from cdm.platform.create import init_workspace
from cdm.safetensors_io import state_sha256
from flows.cli import main as cli


def test_a_brought_base_is_registered_with_its_statement_and_a_misfit_is_refused(tmp_path, small_params, capsys):
    p = small_params()
    ws = init_workspace(tmp_path / "ws", params=p)
    c = registry.client(ws.tracking_uri())
    cfg = model_config(p)
    not_unet = tmp_path / "not-a-unet"
    not_unet.mkdir()
    (not_unet / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    misfits = {
        not_unet: "not a diffusers UNet folder",
        save_unet(build_unet(replace(cfg, image_size=16), seed=0), tmp_path / "bigger"): "sample size 16",
        save_unet(build_unet(replace(cfg, num_classes=5), seed=0), tmp_path / "fewer-labels"): "null label) 6 where the workspace's data need 11",
        save_unet(build_unet(replace(cfg, block_out_channels=(32, 64), norm_num_groups=16), seed=0),
                  tmp_path / "wider"): "architecture is not the workspace's model",
    }
    # A setting that changes no weight's shape changes the network all the same: named, refused.
    other_act = save_unet(build_unet(cfg, seed=0), tmp_path / "other-activation")
    config = json.loads((other_act / "config.json").read_text())
    (other_act / "config.json").write_text(json.dumps({**config, "act_fn": "relu"}))
    misfits[other_act] = "act_fn 'relu'"
    listed = tmp_path / "config-is-a-list"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    misfits[listed] = "not a diffusers UNet folder"
    for folder, reason in misfits.items():
        capsys.readouterr()
        assert cli(["pretrain", "--from", str(folder), "--trained-on", "x", "--workspace", str(ws.root)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], err
        assert registry.alias_version(c, registry.INIT, registry.CURRENT) is None  # nothing registered
    assert not c.search_registered_models()
    good = save_unet(build_unet(cfg, seed=3), tmp_path / "ours")
    assert cli(["pretrain", "--from", str(good), "--workspace", str(ws.root)]) == 2  # the statement is required
    assert cli(["pretrain", str(tmp_path), "--trained-on", "x", "--workspace", str(ws.root)]) == 2  # not both
    statement = "public-domain digits we drew ourselves (no owner's data)"
    assert cli(["pretrain", "--from", str(good), "--trained-on", statement, "--workspace", str(ws.root)]) == 0
    mv = registry.alias_version(c, registry.INIT, registry.CURRENT)
    assert mv.tags["cdm.trained_on"] == statement and mv.tags["cdm.brought"] == "true"
    assert mv.tags["cdm.state_sha256"] == state_sha256(load_unet(good).state_dict())
    # The evaluation's unseen split keeps every held-out digit: a brought base comes with no sample list.
    from cdm.platform.workspace.context import Context
    from cdm.platform.evaluation.evaluate import heldout, unseen

    assert len(unseen(Context.load(ws.root))) == len(heldout(p))
