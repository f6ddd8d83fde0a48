"""Smoke run of the text-to-image library end to end on the compositional digits (not benchmark v4, #28):
data, a small base pretrained on public captions, the attribute classifier (its ceiling on held-out real images),
the base's alignment on held-out prompts, four LoRA compartments (colour domains), the prompt prior, the composite's
alignment, and the attribution of prompts that only one owner's colours match.

    python bench/text_smoke.py VAE_STEPS UNET_STEPS LORA_STEPS      (prints one line per stage; files in /tmp/t28/run)

Run 2026-12-06 with `100 200 60` on the quiet 2-core machine: pretrain 39 s; ceiling 0.948 [0.932, 0.962];
base alignment 0.104 [0.065, 0.146] (undertrained at 200 steps); LoRA 7-9 s each; 100 prompts x 50 steps 12 s;
single-owner attribution 1.00, 0.95, 1.00, 1.00; 146 s in all.
"""
import sys, time, json
import torch
from pathlib import Path
torch.set_num_threads(2)
from cdm.text.digits import write_demo_owners, parse_caption
from cdm.text.captions import load_imagefolder
from cdm.text.base import TextBaseConfig, write_tokenizer, build_base, save_base
from cdm.text.train import PretrainConfig, pretrain_base, encode_latents, encode_captions, train_unet, TextTrainConfig
from cdm.text.compose import GuidedComposite, train_prompt_prior, pooled
from cdm.text.pipeline import TextCompositePipeline, UNetCompartment
from cdm.text.alignment import train_attribute_classifier, alignment, ClassifierConfig
from cdm.data import save_grid
import copy

out = Path("/tmp/t28/run"); out.mkdir(parents=True, exist_ok=True)
VAE, UNET, LORA = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
t0 = time.time()
folders = write_demo_owners(out / "data", n_owners=4, per_owner=200, public=1500, heldout=300, seed=0)
pub = load_imagefolder(folders["public"], 32)
print("data", round(time.time() - t0, 1), len(pub), flush=True)
tok = write_tokenizer(pub.captions, out / "tok", 64)
parts = build_base(TextBaseConfig(), tok)
t = time.time()
info = pretrain_base(parts, pub.x, pub.captions, PretrainConfig(vae_steps=VAE, unet_steps=UNET), progress=False)
print("pretrain", round(time.time() - t, 1), "vae", info["vae_losses"][-1], "unet", sum(info["unet_losses"][-50:]) / 50, flush=True)
save_base(parts, out / "base")
# alignment classifier
t = time.time()
scenes = [parse_caption(c) for c in pub.captions]
clf = train_attribute_classifier(pub.x, scenes, ClassifierConfig(steps=800))
held = load_imagefolder(folders["heldout"], 32)
hs = [parse_caption(c) for c in held.captions]
print("classifier", round(time.time() - t, 1), "ceiling", alignment(clf, held.x, hs).as_dict(), flush=True)
# base samples on held-out prompts
sched = copy.deepcopy(parts["scheduler"])
lat = encode_latents(parts["vae"], pub.x[:8])
shape = tuple(lat.shape[1:])
base = GuidedComposite([UNetCompartment(parts["unet"])], "prior", guidance_scale=3.0)
pipe = TextCompositePipeline(parts["vae"], parts["tokenizer"], parts["text_encoder"], base, sched, None, shape)
t = time.time()
prompts = held.captions[:100]
res = pipe(prompts, guidance_scale=3.0, num_inference_steps=50, generator=torch.Generator().manual_seed(0))
print("sample100", round(time.time() - t, 1), "base alignment", alignment(clf, res["images"], hs[:100]).as_dict(), flush=True)
save_grid(res["images"][:32], out / "base.png", nrow=8)
# LoRA compartments
owners = [load_imagefolder(folders[f"owner-{k:02d}"], 32) for k in range(4)]
empty = encode_captions(parts["tokenizer"], parts["text_encoder"], [""])
unets, feats, idx = [], [], []
for k, o in enumerate(owners):
    t = time.time()
    z = encode_latents(parts["vae"], o.x)
    c = encode_captions(parts["tokenizer"], parts["text_encoder"], o.captions)
    r = train_unet(copy.deepcopy(parts["unet"]), z, c, empty, parts["scheduler"], TextTrainConfig(steps=LORA))
    unets.append(UNetCompartment(r.unet))
    from cdm.text.train import tokenize
    feats.append(pooled(c, tokenize(parts["tokenizer"], o.captions), parts["tokenizer"].eos_token_id))
    idx.append(torch.full((len(o),), k))
    print("lora", k, round(time.time() - t, 1), sum(r.losses[-20:]) / 20, flush=True)
prior = train_prompt_prior(torch.cat(feats), torch.cat(idx), 4)
comp = GuidedComposite(unets, "prior", guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
pipe = TextCompositePipeline(parts["vae"], parts["tokenizer"], parts["text_encoder"], comp, sched, prior, shape)
t = time.time()
res = pipe(prompts, guidance_scale=3.0, num_inference_steps=50, generator=torch.Generator().manual_seed(0))
print("composite sample100", round(time.time() - t, 1), "alignment", alignment(clf, res["images"], hs[:100]).as_dict(), flush=True)
save_grid(res["images"][:32], out / "composite.png", nrow=8)
# attribution: prompts of one owner's colours
from cdm.text.digits import colour_domains, caption, make_scenes
doms = colour_domains(4)
hit = []
for k, d in enumerate(doms):
    sc = make_scenes(20, type(d)(colours=d.colours, two=0.0), 100 + k)
    r = pipe([caption(s) for s in sc], guidance_scale=3.0, num_inference_steps=20, generator=torch.Generator().manual_seed(k))
    hit.append(r["attribution"][:, k].mean().item())
print("single-owner attribution", [round(h, 3) for h in hit], "total", round(time.time() - t0, 1))
