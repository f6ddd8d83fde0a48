"""Text compartments through the CLI, as a user runs them on a workspace made by `cdm init --conditioning text`: a
team's tiny StableDiffusionPipeline folder as the base, captioned owners (colour domains), LoRA compartments
registered adapter-only naming their base, a composite weighted by the prompt prior, `cdm sample --prompt` with
attribution, and a revocation that deletes the owner's adapter, captions and cached latents while the base stays as
it was."""

from __future__ import annotations

import json

import pytest

from cdm.config import Params
from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.text.base import TextBaseConfig, build_base, save_base, write_tokenizer
from cdm.text.digits import write_demo_owners
from flows.cli import main as cli

pytestmark = pytest.mark.usefixtures("prefect_harness")

TINY = TextBaseConfig(image_size=16, vae_channels=(8, 16), latent_channels=4, unet_channels=(16, 32),
                      text_dim=16, text_layers=1, text_heads=2, max_prompt_tokens=64, norm_num_groups=8)
OWNERS = ("ada", "bob", "cyd")  # colour domains 0, 1, 2 of write_demo_owners


def run(capsys, *args) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = cli([*args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """A text workspace with a brought base, three captioned owners ingested, trained and composed."""
    from cdm.platform.create import init_workspace

    tmp = tmp_path_factory.mktemp("text-compartments")
    # 24 images an owner: enough for the stopping rule's validation split (20 at least).
    folders = write_demo_owners(tmp / "data", n_owners=3, per_owner=24, public=30, heldout=4, seed=0)
    captions = [json.loads(line)["text"] for line in (folders["public"] / "metadata.jsonl").read_text().splitlines()]
    base = save_base(build_base(TINY, write_tokenizer(captions, tmp / "tok", TINY.max_prompt_tokens)),
                     tmp / "team-base")
    params = Params.text()
    params.data.image_size = 16
    params.train.steps = 15
    params.compose.num_inference_steps = 4
    # One shard after another: a held-out loss of NaN was seen once in three full runs with the shards and the
    # paragon training on threads at the same time (an open bug, under investigation); training refuses to register
    # a model whose held-out loss is not finite.
    params.train.task_runner = "sequential"
    params.evaluate.n_samples = 20
    params.evaluate.feature_steps = 60  # the attribute classifier's steps (figures meaningless at this size)
    ws = init_workspace(tmp / "ws", params=params)
    assert cli(["pretrain", "--from", str(base), "--trained-on", "public digits", "--workspace", str(ws.root)]) == 0
    for owner, k in zip(OWNERS, range(3)):
        assert cli(["ingest", owner, str(folders[f"owner-{k:02d}"]), "--workspace", str(ws.root)]) == 0
    assert cli(["train", "--paragon", "--workspace", str(ws.root)]) == 0
    assert cli(["compose", "--workspace", str(ws.root)]) == 0
    return {"ws": ws, "folders": folders, "base": base}


def test_compartments_are_adapters_registered_with_the_base_they_adapt(story):
    ws = story["ws"]
    ctx = Context.load(ws.root)
    init = registry.alias_version(ctx.client, registry.INIT, registry.CURRENT)
    shards = [mv for mv in registry.all_versions(ctx.client) if mv.name.startswith(registry.SHARD_PREFIX)]
    assert len(shards) == 3
    for mv in shards:
        assert mv.tags["cdm.compartment"] == "lora" and mv.tags["cdm.base_version"] == str(init.version)
        assert mv.tags["cdm.base_sha256"] == init.tags["cdm.weights_sha256"]
        with registry.model_files(ctx.client, mv.name, str(mv.version), ws.tmp_dir) as files:
            assert (files / "adapter" / "adapter_model.safetensors").is_file() and not (files / "unet").exists()
            stored = sum(p.stat().st_size for p in (files / "adapter").rglob("*") if p.is_file())
        base_unet = (story["base"] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
        assert stored < base_unet / 2  # the adapter alone, not a copy of the base UNet
        # The stopping rule scored the base first and kept what held-out images said was best.
        assert mv.tags["cdm.stopped"] in ("plateau", "cap") and mv.tags["cdm.val_images"] == "4"
        assert float(mv.tags["cdm.val_loss_kept"]) <= float(mv.tags["cdm.val_loss_base"])
    # Latents encoded once per image and cached, one folder per owner key.
    for owner in OWNERS:
        (cache,) = (ws.latents_dir / ws.owner_key(owner)).glob("*.safetensors")
        assert cache.stat().st_mode & 0o077 == 0


def test_a_prompt_only_one_owner_matches_is_attributed_to_her(story, capsys):
    from cdm.text.digits import colour_domains

    ws = story["ws"]
    colour = colour_domains(3)[0].colours[0]  # one of ada's colours, and no one else's
    code, doc, _ = run(capsys, "sample", "--n", "4", "--prompt", f"a {colour} 3 on the left", "--out",
                       str(ws.root / "outputs" / "ada.png"), "--workspace", str(ws.root))
    assert code == 0 and doc["prompt"] == f"a {colour} 3 on the left" and len(doc["samples"]) == 4
    assert (ws.root / "outputs" / "ada.png").is_file()
    assert all(abs(sum(s["attribution"].values()) - 1) < 1e-4 and set(s["attribution"]) == set(OWNERS)
               for s in doc["samples"])
    # `prior` draws each sample's compartment from p(i | c); `average` weighs by p(i | c) itself: her share.
    from cdm.platform.models.composites import load_production

    with load_production(Context.load(ws.root)) as model:
        out = model.predict({"prompt": f"a {colour} 3 on the left", "n": 1, "estimator": "average",
                             "num_inference_steps": 2})
    assert out["attribution"][0][ws.owner_key("ada")] >= 0.8, out["attribution"]
    # A label, or no prompt, is refused in one line on a text workspace.
    for args, why in ((["--label", "3"], "not a label"), ([], "--prompt")):
        code, doc, err = run(capsys, "sample", "--n", "2", *args, "--workspace", str(ws.root))
        assert code == 2 and why in doc["error"], doc


def test_evaluate_reports_alignment_and_fid_with_the_paragon_beside_them(story, capsys):
    ws = story["ws"]
    code, m, _ = run(capsys, "evaluate", "--out", str(ws.root / "outputs" / "metrics.json"), "--workspace",
                     str(ws.root))
    assert code == 0, m
    assert m["conditioning"] == "text" and m["n"] == 20 and m["fid"] > 0 and m["fid_ci"][0] <= m["fid"] <= m["fid_ci"][1]
    assert m["floor_real"] > 0 and 0 <= m["alignment"]["score"] <= 1 and 0 <= m["alignment_ceiling"]["score"] <= 1
    assert m["paragon_version"] and m["fid_ratio"] == pytest.approx(m["fid"] / m["fid_paragon"])
    assert set(m["attribution"]) == {ws.owner_key(o) for o in OWNERS} and m["regressions"] == []
    assert json.loads((ws.root / "outputs" / "metrics.json").read_text())["composite_version"] == m["composite_version"]
    code, doc, _ = run(capsys, "evaluate", "--grid", "g.png", "--workspace", str(ws.root))
    assert code == 2 and "class workspaces" in doc["error"]


def test_revoking_a_text_owner_deletes_her_adapter_captions_and_latents_and_leaves_the_base(story, capsys):
    ws = story["ws"]
    ctx = Context.load(ws.root)
    key = ws.owner_key("bob")
    captions = sorted(set(ws.captions("bob").values()))
    assert captions and (ws.latents_dir / key).is_dir()
    base_before = registry.alias_version(ctx.client, registry.INIT, registry.CURRENT).tags["cdm.weights_sha256"]
    holding = [p for p in ws.root.rglob("*") if p.is_file() and any(c.encode() in p.read_bytes() for c in captions)]
    assert holding  # the search below can find her captions: it does before the revocation
    # A server that loaded the composite (and her compartment) before the revocation.
    from cdm.platform.models.composites import load_production
    from cdm.text.digits import colour_domains

    prompt = f"a {colour_domains(3)[1].colours[0]} 5 on the right"  # her colours only
    loaded = load_production(ctx)
    served = loaded.__enter__()
    before = served.predict({"prompt": prompt, "n": 2, "seed": 0, "estimator": "average"})
    assert sum(a[key] for a in before["attribution"]) / 2 >= 0.8 and served.unwrap_python_model().prior is not None
    prior_before = prior_sha(ctx)
    code, doc, _ = run(capsys, "revoke", "bob", "--wait", "--workspace", str(ws.root))
    assert code == 0, doc
    after = served.predict({"prompt": prompt, "n": 2, "seed": 0})  # the same process, the next request
    loaded.__exit__(None, None, None)
    assert all(a.get(key, 0.0) == 0.0 for a in after["attribution"]) and len(after["shards"]) == 2
    assert served.unwrap_python_model().prior is None  # fitted on her captions too: not used again by the server that loaded it
    assert prior_sha(ctx) != prior_before  # production's prior was fitted again, without her captions
    cert = doc
    assert cert["verification"]["ok"] and cert["prompt_prior_retrained"] is True
    assert cert["shared_base"]["weights_sha256"] == base_before and not cert["shared_base"]["touched"]
    assert not (ws.latents_dir / key).exists()
    assert not [mv for mv in registry.all_versions(ctx.client) if key in mv.tags.get("cdm.owner_keys", "")]
    # No caption of hers in any file of the workspace (data, DVC cache, MLflow store and artifacts, logs, ...).
    for path in ws.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [c for c in captions if c.encode() in data], path
    # The composite served now has no compartment of hers; a prompt of her colours goes to the others.
    code, doc, _ = run(capsys, "sample", "--n", "2", "--prompt", prompt, "--workspace", str(ws.root))
    assert code == 0 and len(doc["shards"]) == 2
    assert all(s["attribution"].get(key, 0.0) == 0.0 for s in doc["samples"])  # her key (she is no owner now)


def prior_sha(ctx) -> str:
    """sha256 of production's prompt prior."""
    import hashlib

    from cdm.platform.models.composites import production

    with registry.model_files(ctx.client, registry.COMPOSITE, production(ctx)[0], ctx.ws.tmp_dir) as files:
        return hashlib.sha256((files / "prior.safetensors").read_bytes()).hexdigest()
