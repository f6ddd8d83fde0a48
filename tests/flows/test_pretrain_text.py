"""A text workspace's base: a team's StableDiffusionPipeline folder registered by `cdm pretrain --from` (local
safetensors only, every part checked against the workspace; anything else refused in one line, nothing registered),
or a small base pretrained on public captions; either is served by prompt."""

from __future__ import annotations

import json
import shutil

import pytest

from cdm.config import Params
from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.text.base import TextBaseConfig, build_base, save_base, write_tokenizer
from flows.cli import main as cli

pytestmark = pytest.mark.usefixtures("prefect_harness")

TINY = TextBaseConfig(image_size=16, vae_channels=(8, 16), latent_channels=4, unet_channels=(16, 32),
                      text_dim=16, text_layers=1, text_heads=2, max_prompt_tokens=64, norm_num_groups=8)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from cdm.platform.create import init_workspace

    params = Params.text()
    params.data.image_size = 16
    return init_workspace(tmp_path_factory.mktemp("text-base") / "ws", params=params)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    parts = build_base(TINY, write_tokenizer(["a red 3 on the left"], tmp / "tok", TINY.max_prompt_tokens))
    return save_base(parts, tmp / "team-base")


def versions(ws) -> list:
    c = registry.client(ws.tracking_uri())
    return [mv for mv in registry.all_versions(c) if mv.name == registry.INIT]


def refused(ws, folder, capsys, why: str) -> None:
    before = len(versions(ws))
    capsys.readouterr()  # what the test's own setup printed
    code = cli(["pretrain", "--from", str(folder), "--trained-on", "public digits", "--workspace", str(ws.root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and why in err[0], err
    assert len(versions(ws)) == before  # nothing registered


def test_a_teams_pipeline_folder_is_registered_and_served_by_prompt(ws, pipeline_folder, capsys):
    assert cli(["pretrain", "--from", str(pipeline_folder), "--trained-on", "public digits (MNIST, CC-BY-SA)",
                "--workspace", str(ws.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["brought"] and set(doc["components"]) >= {"unet/diffusion_pytorch_model.safetensors",
                                                         "vae/diffusion_pytorch_model.safetensors", "unet/config.json",
                                                         "text_encoder/model.safetensors", "tokenizer/tokenizer.json"}
    (mv,) = [v for v in versions(ws) if str(v.version) == str(doc["version"])]
    assert mv.tags["cdm.trained_on"] == "public digits (MNIST, CC-BY-SA)" and mv.tags["cdm.brought"] == "true"
    assert mv.tags["cdm.weights_sha256"] == doc["base_sha256"]
    ctx = Context.load(ws.root)
    model = registry.load_pyfunc(ctx.client, f"models:/{registry.INIT}/{doc['version']}", ws.tmp_dir / "t")
    out = model.predict({"prompt": "a red 3 on the left", "n": 2, "num_inference_steps": 3, "seed": 0})
    assert out["images"].shape == (2, 3, 16, 16) and out["prompt"] == "a red 3 on the left"
    from cdm.platform.forgetting.certify import shared_base

    base = shared_base(ctx)  # what a revocation's certificate names: the base as stored, untouched
    assert base["version"] == str(doc["version"]) and base["weights_sha256"] == doc["base_sha256"]
    assert not base["touched"]


def test_what_is_not_a_fitting_pipeline_is_refused_in_one_line(ws, pipeline_folder, tmp_path, capsys):
    refused(ws, tmp_path / "missing", capsys, "not a folder")
    unet_only = tmp_path / "unet-only"
    shutil.copytree(pipeline_folder / "unet", unet_only)
    refused(ws, unet_only, capsys, "model_index.json missing")
    pickled = tmp_path / "pickled"
    shutil.copytree(pipeline_folder, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    refused(ws, pickled, capsys, "pickled weights are not loaded")
    other = tmp_path / "other-size"
    big = TextBaseConfig(**{**TINY.__dict__, "image_size": 32})
    save_base(build_base(big, write_tokenizer(["x"], tmp_path / "tok", 64)), other)
    refused(ws, other, capsys, "data.image_size is 16")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(pipeline_folder, corrupt)
    (corrupt / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    refused(ws, corrupt, capsys, "do not load")


def test_a_small_base_is_pretrained_on_public_captions(ws, tmp_path, capsys):
    from cdm.text.captions import write_imagefolder
    from cdm.text.digits import Domain, caption, glyph_pools, make_scenes, png_rgb, render_all

    scenes = make_scenes(24, Domain(), seed=5)
    images = render_all(scenes, glyph_pools(), seed=5)
    src = write_imagefolder([png_rgb(im) for im in images], [caption(s) for s in scenes], tmp_path / "public")
    assert cli(["pretrain", str(src), "--steps", "3", "--workspace", str(ws.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["samples"] == 24 and not doc["brought"]
    (mv,) = [v for v in versions(ws) if str(v.version) == str(doc["version"])]
    assert mv.tags["cdm.samples"] == "24" and mv.tags["cdm.public_manifest_sha256"]
    # A bad caption in the public data refuses it like an owner's batch.
    meta = src / "metadata.jsonl"
    meta.write_text(meta.read_text() + json.dumps({"file_name": "ghost.png", "text": "a red 1 on the left"}) + "\n")
    assert cli(["pretrain", str(src), "--steps", "3", "--workspace", str(ws.root)]) == 2
