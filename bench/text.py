"""Benchmark v4: text-to-image compartments on the compositional digits (`make bench-text`).

    python bench/text.py                 # 3 training seeds x 2 partitions: bench/text.json and bench/TEXT.md
    python bench/text.py --quick         # a minutes-long run of every code path (numbers meaningless)

Data (`cdm.text.digits`): 32x32 RGB canvases with one or two coloured MNIST digits and a caption from the grammar
(digit, colour, side). The glyphs are split once: the public part (the base and the attribute classifier train on
it), the owners' part, and a held-out part (real images: the FID reference, the noise floor and the alignment
ceiling). Two partitions of the owners' images, 8 owners each:

    domain   owner k holds one colour group x one digit half (red | green | blue+yellow | magenta+cyan) x (0-4 | 5-9),
             as licensors hold different material: a prompt of one owner's colours and digits is hers alone
    iid      every owner draws from every colour and digit

Models: one base pretrained on the public part (a small StableDiffusionPipeline: VAE, character-level CLIP text
encoder, UNet2DConditionModel). Per training seed and partition: 8 LoRA compartments and one paragon adapter on all
8 owners' images, every one under the same stopping rule (`cdm.text.train.TextTrainConfig`: the held-out loss of a
content-hash validation split scored at step 0 and every 50 steps under fixed noise, stop after 3 scores without a
gain, keep the best; caps flagged). The composite: the compartments with the prompt prior fitted on their captions,
the `prior` estimator (the default: two UNet evaluations a step, the paragon's cost), guidance 3 on both.

Figures per (seed, partition), on the same held-out prompts with the same initial noise for composite and paragon
(common random numbers): prompt alignment (the attribute classifier's share of right answers) of each and their
ratio with a paired bootstrap over prompts; FID against the held-out real images (features: the attribute
classifier's pooled trunk, trained on public images) of each and their ratio with a paired bootstrap; the
real-vs-real floor at the same N; seconds per image of each; adapter bytes per owner. Across seeds: the mean of the
per-seed ratios with a Student-t interval. The domain partition adds the attribution of single-owner prompts (goal
>= 0.8) and the forgetting row: owner 0 revoked (her compartment gone, the prior refitted without her captions),
her prompts' attribution to her and their alignment before, after and under the base alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdm.quality import frechet_distance, t_interval  # noqa: E402
from cdm.text.alignment import ClassifierConfig, answered, train_attribute_classifier  # noqa: E402
from cdm.text.base import TextBaseConfig, build_base, write_tokenizer  # noqa: E402
from cdm.text.compose import GuidedComposite, PromptPriorConfig, pooled, train_prompt_prior  # noqa: E402
from cdm.text.digits import Domain, caption, glyph_pools, glyph_split, make_scenes, render_all  # noqa: E402
from cdm.text.pipeline import TextCompositePipeline, UNetCompartment  # noqa: E402
from cdm.text.train import (PretrainConfig, TextTrainConfig, encode_captions, encode_latents, pretrain_base,  # noqa: E402
                            tokenize, train_unet)

HERE = Path(__file__).resolve().parent
COLOUR_GROUPS = (("red",), ("green",), ("blue", "yellow"), ("magenta", "cyan"))
DIGIT_HALVES = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


def domain_owners() -> list[Domain]:
    return [Domain(digits=d, colours=c) for c in COLOUR_GROUPS for d in DIGIT_HALVES]


def images_of(scenes, glyph_index, seed: int) -> torch.Tensor:
    """[N, 3, 32, 32] in [-1, 1]."""
    x = render_all(scenes, glyph_pools(glyph_index), seed)
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def feats(clf, x: torch.Tensor) -> np.ndarray:
    """The attribute classifier's trunk, pooled: [N, 64] (FID features trained on public images only)."""
    with torch.no_grad():
        return torch.cat([clf.features(x[i:i + 256]).mean((2, 3)) for i in range(0, len(x), 256)]).double().numpy()


def boot_ratio(num_a, den_a, num_b, den_b, rng, boot: int = 2000) -> list[float]:
    """Paired bootstrap over items of (sum num_a / sum den_a) / (sum num_b / sum den_b): 95% interval."""
    n = len(num_a)
    idx = rng.integers(0, n, (boot, n))
    r = (num_a[idx].sum(1) / den_a[idx].sum(1)) / (num_b[idx].sum(1) / den_b[idx].sum(1))
    return [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))]


def boot_fid_ratio(ref, fa, fb, rng, boot: int = 200) -> list[float]:
    n = len(fa)
    rs = []
    for _ in range(boot):
        i = rng.integers(0, n, n)
        j = rng.integers(0, len(ref), len(ref))
        rs.append(frechet_distance(ref[j], fa[i]) / frechet_distance(ref[j], fb[i]))
    return [float(np.quantile(rs, 0.025)), float(np.quantile(rs, 0.975))]


class Models:
    """The base's parts and the helpers that train and sample on it."""

    def __init__(self, parts: dict, guidance: float, steps: int):
        self.p, self.guidance, self.steps = parts, guidance, steps
        self.empty = encode_captions(parts["tokenizer"], parts["text_encoder"], [""])
        z = encode_latents(parts["vae"], torch.zeros(1, 3, 32, 32))
        self.latent_shape = tuple(z.shape[1:])

    def states(self, captions):
        return encode_captions(self.p["tokenizer"], self.p["text_encoder"], captions)

    def features(self, captions):
        return pooled(self.states(captions), tokenize(self.p["tokenizer"], captions), self.p["tokenizer"].eos_token_id)

    def fit(self, x, captions, cfg: TextTrainConfig, desc: str, k: int | None = None):
        """A LoRA adapter under the stopping rule; the first `k` images (default 10%, at least 8) are its validation
        split (the scenes are drawn iid, so by position is at random)."""
        z, c = encode_latents(self.p["vae"], x), self.states(captions)
        k = k or max(8, len(x) // 10)
        r = train_unet(copy.deepcopy(self.p["unet"]), z[k:], c[k:], self.empty, self.p["scheduler"], cfg,
                       desc=desc, val=(z[:k], c[:k]))
        return r

    def sample(self, unets, prior, prompts, seed: int, estimator: str = "prior", subset=None) -> dict:
        comp = GuidedComposite([UNetCompartment(u) for u in unets], estimator, scheduler=None, subset=subset,
                               generator=torch.Generator().manual_seed(seed + 1))
        sched = copy.deepcopy(self.p["scheduler"])
        pipe = TextCompositePipeline(self.p["vae"], self.p["tokenizer"], self.p["text_encoder"], comp, sched, prior,
                                     self.latent_shape)
        t = time.perf_counter()
        out = pipe(prompts, guidance_scale=self.guidance, num_inference_steps=self.steps,
                   generator=torch.Generator().manual_seed(seed))
        return {**out, "seconds_per_image": (time.perf_counter() - t) / len(prompts)}


def run(args) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    q = args.quick
    pub_i, own_i, held_i = glyph_split(0)
    n_public, n_owner, n_held = (300, 40, 120) if q else (3000, 250, 600)
    public = make_scenes(n_public, Domain(), 1)
    x_pub = images_of(public, pub_i, 1)
    held = make_scenes(n_held, Domain(), 2)
    x_held = images_of(held, held_i, 2)
    # The base and the instruments (public data only).
    tok = write_tokenizer([caption(s) for s in public], Path(args.work) / "tok", 64)
    parts = build_base(TextBaseConfig(), tok)
    pcfg = PretrainConfig(vae_steps=30 if q else 400, unet_steps=30 if q else args.base_steps, seed=0)
    t = time.perf_counter()
    info = pretrain_base(parts, x_pub, [caption(s) for s in public], pcfg, progress=False)
    base_seconds = time.perf_counter() - t
    print(f"base: {base_seconds:.0f} s", flush=True)
    clf = train_attribute_classifier(x_pub, public, ClassifierConfig(steps=100 if q else 1500))
    right, asked = answered(clf, x_held, held)
    ceiling = float(right.sum() / asked.sum())
    ref = feats(clf, x_held)
    half = n_held // 2
    floor = frechet_distance(ref[:half], ref[half:])  # real vs real, disjoint halves of N/2
    m = Models(parts, args.guidance, 5 if q else args.sample_steps)
    prompts_n = 40 if q else args.prompts
    eval_scenes = make_scenes(prompts_n, Domain(), 3)
    eval_prompts = [caption(s) for s in eval_scenes]
    base_out = m.sample([parts["unet"]], None, eval_prompts, seed=5)
    r_base, a_base = answered(clf, base_out["images"], eval_scenes)
    base_fid = frechet_distance(ref, feats(clf, base_out["images"]))
    rows = []
    cap_c, cap_p = (20, 40) if q else (args.compartment_cap, args.paragon_cap)
    partitions = ["domain"] if q else args.partitions
    for seed in range(args.seeds):
        for part in partitions:
            tp = time.perf_counter()
            doms = domain_owners() if part == "domain" else [Domain()] * 8
            owner_scenes = [make_scenes(n_owner, d, 100 + 10 * k + (0 if part == "domain" else 1000))
                            for k, d in enumerate(doms)]
            xs = [images_of(s, own_i, 200 + k) for k, s in enumerate(owner_scenes)]
            caps = [[caption(s) for s in sc] for sc in owner_scenes]
            cfg = TextTrainConfig(steps=cap_c, batch_size=32, lr=1e-3, seed=seed, eval_every=10 if q else 50)
            comps = [m.fit(x, c, cfg, f"{part}-{k}") for k, (x, c) in enumerate(zip(xs, caps))]
            # The paragon: every owner's images, its validation split the same images as the compartments'.
            k_val = max(8, n_owner // 10)
            x_all = torch.cat([x[:k_val] for x in xs] + [x[k_val:] for x in xs])
            c_all = [c for cs in caps for c in cs[:k_val]] + [c for cs in caps for c in cs[k_val:]]
            para = m.fit(x_all, c_all, TextTrainConfig(steps=cap_p, batch_size=32, lr=1e-3, seed=seed,
                                                       eval_every=10 if q else 50), f"{part}-paragon",
                         k=8 * k_val)
            feats_c = torch.cat([m.features(c) for c in caps])
            owner_idx = torch.cat([torch.full((len(c),), k) for k, c in enumerate(caps)])
            prior = train_prompt_prior(feats_c, owner_idx, 8, PromptPriorConfig(seed=seed))
            unets = [r.unet for r in comps]
            out_c = m.sample(unets, prior, eval_prompts, seed=1000 + seed)
            out_p = m.sample([para.unet], None, eval_prompts, seed=1000 + seed)
            rc, ac = answered(clf, out_c["images"], eval_scenes)
            rp, ap = answered(clf, out_p["images"], eval_scenes)
            fc, fp = feats(clf, out_c["images"]), feats(clf, out_p["images"])
            rng = np.random.default_rng(seed)
            row = {
                "seed": seed, "partition": part,
                "alignment_composite": float(rc.sum() / ac.sum()), "alignment_paragon": float(rp.sum() / ap.sum()),
                "alignment_ratio": float((rc.sum() / ac.sum()) / (rp.sum() / ap.sum())),
                "alignment_ratio_ci": boot_ratio(rc, ac, rp, ap, rng),
                "fid_composite": frechet_distance(ref, fc), "fid_paragon": frechet_distance(ref, fp),
                "fid_ratio_ci": boot_fid_ratio(ref, fc, fp, rng, boot=50 if q else 200),
                "seconds_per_image_composite": out_c["seconds_per_image"],
                "seconds_per_image_paragon": out_p["seconds_per_image"],
                "adapter_bytes_per_owner": int(np.mean([sum(v.numel() * v.element_size() for v in r.adapter.values())
                                                        for r in comps])),
                "compartments": [{"best_step": r.best_step, "stopped": r.stopped, "steps_run": len(r.losses),
                                  "val_loss_base": r.val_losses[0][1], "val_loss_kept": min(v for _, v in r.val_losses)}
                                 for r in comps],
                "paragon": {"best_step": para.best_step, "stopped": para.stopped, "steps_run": len(para.losses),
                            "val_loss_base": para.val_losses[0][1],
                            "val_loss_kept": min(v for _, v in para.val_losses)},
            }
            row["fid_ratio"] = row["fid_composite"] / row["fid_paragon"]
            row["cost_ratio"] = row["seconds_per_image_composite"] / row["seconds_per_image_paragon"]
            if part == "domain":
                row.update(single_owner_and_forgetting(m, clf, comps, caps, doms, prior, owner_idx, feats_c, seed, q,
                                                       parts))
            row["seconds"] = time.perf_counter() - tp
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("compartments",)}, default=float), flush=True)
    summary = summarize(rows)
    return {"quick": q, "args": vars(args), "machine": {"cpus": os.cpu_count(), "torch_threads":
                                                          torch.get_num_threads(), "python": platform.python_version(),
                                                          "torch": torch.__version__},
            "base": {"unet_bytes": sum(v.numel() * v.element_size() for v in parts["unet"].state_dict().values()),
                     "unet_steps": pcfg.unet_steps, "vae_steps": pcfg.vae_steps, "seconds": round(base_seconds, 1),
                     "final_unet_loss": float(np.mean(info["unet_losses"][-50:])),
                     "alignment": float(r_base.sum() / a_base.sum()), "fid": base_fid},
            "ceiling_alignment": ceiling, "fid_floor_real": floor, "n_prompts": prompts_n, "n_heldout_real": n_held,
            "rows": rows, "summary": summary, "seconds": round(time.perf_counter() - t0, 1)}


def single_owner_and_forgetting(m, clf, comps, caps, doms, prior, owner_idx, feats_c, seed, q, parts) -> dict:
    """Single-owner prompts (each owner's domain, one digit): their attribution to her (`average`: lambda itself;
    `prior`: the draws); then owner 0 revoked: her compartment gone, the prior refitted without her captions."""
    n = 10 if q else 40
    single = {}
    for k, d in enumerate(doms):
        scenes = make_scenes(n, Domain(digits=d.digits, colours=d.colours, two=0.0), 500 + k)
        out = m.sample([c.unet for c in comps], prior, [caption(s) for s in scenes], seed=2000 + k)
        single[k] = float(out["attribution"][:, k].mean())
    victim = 0
    scenes = make_scenes(n, Domain(digits=doms[victim].digits, colours=doms[victim].colours, two=0.0), 900)
    prompts = [caption(s) for s in scenes]
    before = m.sample([c.unet for c in comps], prior, prompts, seed=3000)
    keep = owner_idx != victim
    prior_after = train_prompt_prior(feats_c[keep], owner_idx[keep] - (owner_idx[keep] > victim).long(), 7,
                                     PromptPriorConfig(seed=seed))
    after = m.sample([c.unet for k, c in enumerate(comps) if k != victim], prior_after, prompts, seed=3000)
    base = m.sample([parts["unet"]], None, prompts, seed=3000)

    def align(out):
        r, a = answered(clf, out["images"], scenes)
        return float(r.sum() / a.sum())

    return {"single_owner_attribution": single,
            "single_owner_attribution_min": min(single.values()),
            "forgetting": {"victim_share_before": float(before["attribution"][:, victim].mean()),
                           "victim_share_after": 0.0,  # her compartment is not in the composite any more
                           "alignment_before": align(before), "alignment_after": align(after),
                           "alignment_base": align(base), "prompts": n}}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for part in sorted({r["partition"] for r in rows}):
        rs = [r for r in rows if r["partition"] == part]

        def ti(key):
            i = t_interval([r[key] for r in rs])
            return {"mean": i.mean, "low": i.low, "high": i.high, "seeds": len(rs)}

        out[part] = {k: ti(k) for k in ("alignment_ratio", "fid_ratio", "alignment_composite", "alignment_paragon",
                                         "fid_composite", "fid_paragon", "cost_ratio")}
        out[part]["compartments_worse_than_base"] = sum(c["val_loss_kept"] > c["val_loss_base"]
                                                        for r in rs for c in r["compartments"])
        out[part]["compartments_at_cap"] = sum(c["stopped"] == "cap" for r in rs for c in r["compartments"])
        out[part]["paragons_at_cap"] = sum(r["paragon"]["stopped"] == "cap" for r in rs)
        if part == "domain":
            out[part]["single_owner_attribution_min"] = ti("single_owner_attribution_min")
    return out


def report(res: dict) -> str:
    def ci(d, spec=".3f"):
        return f"{d['mean']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}] ({d['seeds']} seeds)"

    lines = ["# Benchmark v4: text-to-image compartments (compositional digits)", "",
             f"Written by `python bench/text.py {' '.join(sys.argv[1:])}` on {res['machine']['cpus']} CPUs in "
             f"{res['seconds'] / 60:.1f} min; numbers from `bench/text.json`." +
             (" **--quick: code paths only; the numbers mean nothing.**" if res["quick"] else ""), "",
             f"Base: {res['base']['unet_steps']} UNet + {res['base']['vae_steps']} VAE steps on the public part "
             f"({res['base']['seconds']:.0f} s); alignment {res['base']['alignment']:.3f}, FID {res['base']['fid']:.2f}. "
             f"Ceiling (real held-out images): alignment {res['ceiling_alignment']:.3f}. FID floor (real vs real, "
             f"disjoint halves of {res['n_heldout_real']}): {res['fid_floor_real']:.2f}. "
             f"{res['n_prompts']} held-out prompts per figure. The base UNet: {res['base']['unet_bytes']} bytes "
             "(what a full compartment would store per owner; a LoRA compartment stores the bytes in the last column).",
             "",
             "| partition | alignment composite / paragon | FID composite / paragon | sampling cost composite / paragon |"
             " compartments worse than base | at cap (compartments / paragons) |",
             "|---|---|---|---|---|---|"]
    for part, s in res["summary"].items():
        lines.append(f"| {part} | {ci(s['alignment_ratio'])} | {ci(s['fid_ratio'])} | {ci(s['cost_ratio'], '.2f')} | "
                     f"{s['compartments_worse_than_base']} | {s['compartments_at_cap']} / {s['paragons_at_cap']} |")
    lines += ["", "Per seed (paired bootstrap 95% intervals over prompts):", "",
              "| seed | partition | alignment C / P | ratio | FID C / P | ratio | bytes per owner |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['seed']} | {r['partition']} | {r['alignment_composite']:.3f} / {r['alignment_paragon']:.3f} "
                     f"| {r['alignment_ratio']:.3f} [{r['alignment_ratio_ci'][0]:.3f}, {r['alignment_ratio_ci'][1]:.3f}] "
                     f"| {r['fid_composite']:.2f} / {r['fid_paragon']:.2f} | {r['fid_ratio']:.3f} "
                     f"[{r['fid_ratio_ci'][0]:.3f}, {r['fid_ratio_ci'][1]:.3f}] | {r['adapter_bytes_per_owner']} |")
    dom = [r for r in res["rows"] if r["partition"] == "domain"]
    if dom:
        lines += ["", "Domain partition: attribution of single-owner prompts to their owner (goal >= 0.8), and the "
                  "forgetting row (owner 0 revoked; her prompts):", "",
                  "| seed | min single-owner attribution | her share before / after | her prompts' alignment before / "
                  "after / base alone |", "|---|---|---|---|"]
        for r in dom:
            f = r["forgetting"]
            lines.append(f"| {r['seed']} | {r['single_owner_attribution_min']:.3f} | {f['victim_share_before']:.3f} / "
                         f"{f['victim_share_after']:.3f} | {f['alignment_before']:.3f} / {f['alignment_after']:.3f} / "
                         f"{f['alignment_base']:.3f} |")
    lines += ["", "Goals (#28): composite alignment >= the paragon's (ratio >= 1), FID ratio <= 1.10, sampling cost "
              "<= 1.2x, single-owner attribution >= 0.8. Read each against its interval above."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every code path in minutes; numbers meaningless")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds (each: fresh compartments and paragon)")
    ap.add_argument("--partitions", nargs="+", default=["domain", "iid"], choices=["domain", "iid"])
    ap.add_argument("--base-steps", type=int, default=1500, help="UNet steps of the base on the public part")
    ap.add_argument("--compartment-cap", type=int, default=400, help="steps cap of a compartment (flagged if hit)")
    ap.add_argument("--paragon-cap", type=int, default=1600, help="steps cap of the paragon (flagged if hit)")
    ap.add_argument("--prompts", type=int, default=300, help="held-out prompts per alignment / FID figure")
    ap.add_argument("--sample-steps", type=int, default=25, help="denoising steps when sampling")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--work", default="/tmp/cdm-bench-text", help="scratch folder (the tokenizer)")
    ap.add_argument("--out", default=str(HERE / "text.json"))
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    res = run(args)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    if not args.quick:
        (HERE / "TEXT.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
