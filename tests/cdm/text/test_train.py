"""Training on a text base, on a tiny pipeline built from configs (as diffusers' own tests do): the base's
pretraining, a LoRA compartment that changes only its adapter, and prompts sampled through the composite."""

from __future__ import annotations

import copy

import pytest
import torch

from cdm.text.base import TextBaseConfig, build_base, write_tokenizer
from cdm.text.digits import Domain, caption, glyph_pools, make_scenes, render_all

TINY = TextBaseConfig(image_size=16, vae_channels=(8, 16), latent_channels=4, unet_channels=(16, 32),
                      text_dim=16, text_layers=1, text_heads=2, max_prompt_tokens=64, norm_num_groups=8)


@pytest.fixture(scope="module")
def data():
    scenes = make_scenes(48, Domain(two=0.0), seed=0)
    images = torch.from_numpy(render_all(scenes, glyph_pools(), seed=0)).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.nn.functional.interpolate(images, size=16, mode="bilinear", antialias=True)  # [48, 3, 16, 16]
    return x, [caption(s) for s in scenes]


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    from cdm.text.train import PretrainConfig, pretrain_base

    x, captions = data
    parts = build_base(TINY, write_tokenizer(captions, tmp_path_factory.mktemp("tok"), TINY.max_prompt_tokens))
    info = pretrain_base(parts, x, captions, PretrainConfig(vae_steps=20, unet_steps=20, batch_size=8))
    return parts, info


def test_pretraining_trains_every_part_and_scales_the_latents_to_unit_variance(base, data):
    from cdm.text.train import encode_latents

    parts, info = base
    assert len(info["vae_losses"]) == 20 and len(info["unet_losses"]) == 20
    assert info["vae_losses"][-1] < info["vae_losses"][0]
    z = encode_latents(parts["vae"], data[0])
    assert z.shape == (48, 4, 8, 8) and 0.7 < float(z.std()) < 1.3


def test_a_lora_compartment_trains_its_adapter_alone_and_starts_as_the_base(base, data):
    from cdm.text.train import TextTrainConfig, encode_captions, encode_latents, train_unet

    parts, _ = base
    x, captions = data
    z = encode_latents(parts["vae"], x)
    cond = encode_captions(parts["tokenizer"], parts["text_encoder"], captions)
    empty = encode_captions(parts["tokenizer"], parts["text_encoder"], [""])
    before = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    cfg = TextTrainConfig(steps=15, batch_size=8, lr=1e-2)
    result = train_unet(copy.deepcopy(parts["unet"]), z, cond, empty, parts["scheduler"], cfg)
    assert result.adapter and all("lora_" in k for k in result.adapter)
    assert all(torch.equal(v, parts["unet"].state_dict()[k]) for k, v in before.items())  # the base untouched
    changed = [k for k, v in result.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out", "conv1", "conv2",
                                                  "time_emb_proj")) for k in changed)
    again = train_unet(copy.deepcopy(parts["unet"]), z, cond, empty, parts["scheduler"], cfg)
    assert all(torch.equal(again.adapter[k], v) for k, v in result.adapter.items())  # seeded: reproducible
    # A zero-step adapter is the base itself (B = 0).
    zero = train_unet(copy.deepcopy(parts["unet"]), z, cond, empty, parts["scheduler"],
                      TextTrainConfig(steps=0, batch_size=8))
    assert all(torch.allclose(v, before[k]) for k, v in zero.unet.state_dict().items())


def test_prompts_are_sampled_through_the_composite_with_attribution(base, data):
    from cdm.text.compose import GuidedComposite, train_prompt_prior
    from cdm.text.pipeline import TextCompositePipeline, UNetCompartment

    parts, _ = base
    comp = GuidedComposite([UNetCompartment(parts["unet"]), UNetCompartment(copy.deepcopy(parts["unet"]))],
                           "path", scheduler=copy.deepcopy(parts["scheduler"]))
    prior = train_prompt_prior(torch.randn(20, TINY.text_dim), torch.tensor([0, 1] * 10), 2)
    pipe = TextCompositePipeline(parts["vae"], parts["tokenizer"], parts["text_encoder"], comp, comp.scheduler,
                                 prior, (4, 8, 8))
    steps = []
    out = pipe(["a red 3 on the left", "a blue 7 on the right", ""], negative_prompt="a green 1 on the left",
               guidance_scale=2.0, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
               callback_on_step_end=lambda i, t: steps.append(i))
    assert out["images"].shape == (3, 3, 16, 16) and out["images"].abs().max() <= 1
    assert torch.allclose(out["attribution"].sum(1), torch.ones(3)) and steps == [0, 1, 2, 3]
    assert comp.evaluations == 4 * 2 * 2 * 3  # steps x branches x compartments x prompts (path is dense)


def test_the_stopping_rule_keeps_the_base_when_fine_tuning_only_hurts_and_the_best_step_otherwise(base, data):
    """Held-out loss scored at step 0 under fixed noise: a fine-tune that makes it worse (a rate far too high) ends
    as the base itself; one that helps keeps a later step, and a rule that never fired is flagged `cap`."""
    from cdm.text.train import TextTrainConfig, encode_captions, encode_latents, heldout_loss, train_unet

    parts, _ = base
    x, captions = data
    z = encode_latents(parts["vae"], x)
    cond = encode_captions(parts["tokenizer"], parts["text_encoder"], captions)
    empty = encode_captions(parts["tokenizer"], parts["text_encoder"], [""])
    train, val = slice(0, 36), slice(36, 48)
    sched = parts["scheduler"]
    base_loss = heldout_loss(parts["unet"], z[val], cond[val], sched, seed=7919)
    hurt = TextTrainConfig(steps=40, batch_size=8, lr=5.0, eval_every=10, patience=2)
    result = train_unet(copy.deepcopy(parts["unet"]), z[train], cond[train], empty, sched, hurt, val=(z[val], cond[val]))
    assert result.val_losses[0] == (0, pytest.approx(base_loss)) and result.best_step == 0
    assert all(not loss <= base_loss for _, loss in result.val_losses[1:])  # it did hurt (NaN too): control fired
    assert result.stopped == "plateau" and len(result.losses) < 40
    assert all(torch.equal(v, parts["unet"].state_dict()[k]) for k, v in result.unet.state_dict().items())
    helps = TextTrainConfig(steps=30, batch_size=8, lr=1e-2, eval_every=10, patience=5)
    result = train_unet(copy.deepcopy(parts["unet"]), z[train], cond[train], empty, sched, helps,
                        val=(z[val], cond[val]))
    assert result.best_step > 0 and result.stopped == "cap"
    assert heldout_loss(result.unet, z[val], cond[val], sched, seed=7919) == pytest.approx(
        dict(result.val_losses)[result.best_step], rel=1e-4)
