"""Markdown report of `bench/regime.py`'s JSON (every figure below is read from it).

    python bench/regime_report.py bench/regime.json bench/REGIME.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(d: dict, scale: float = 1.0, digits: int = 3) -> str:
    m, lo, hi = (d[k] * scale for k in ("mean", "low", "high"))
    if lo != lo:  # nan: one value
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def row_table(rows: list[dict]) -> list[str]:
    out = ["| compartments | regime | seeds x sets | FID composite | FID paragon | **FID ratio** | ratio, floor "
           "subtracted | **bits/dim gap** | gain kept: FID / bits/dim | KID difference (std. features, x1e3) | "
           "precision comp / para | recall comp / para | class acc. comp / para | worse than base / capped |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        regime = r["regime"] + (f" B={r['budget']}" if r["budget"] else "")
        out.append(
            f"| {r['kind']} | {regime} | {r['training_seeds']} x {r['sets_per_model']} | "
            f"{ci(r['composite_fid'], digits=2)} | {ci(r['paragon_fid'], digits=2)} | **{ci(r['fid_ratio'])}** | "
            f"{ci(r['fid_minus_floor_ratio'])} | **{ci(r['bpd_gap'])}** | {ci(r['gain_kept']['fid'], digits=2)} / "
            f"{ci(r['gain_kept']['bpd'], digits=2)} | {ci(r['kid_std_difference_x1e3'], digits=2)} | "
            f"{r['composite_precision']['mean']:.3f} / {r['paragon_precision']['mean']:.3f} | "
            f"{r['composite_recall']['mean']:.3f} / {r['paragon_recall']['mean']:.3f} | "
            f"{r['composite_class_accuracy']['mean']:.3f} / {r['paragon_class_accuracy']['mean']:.3f} | "
            f"{r['compartments_worse_than_base']} of {r['compartments']} / compartments {r['compartments_capped']}, "
            f"paragons {r['paragons_capped']} |")
    return out


def seed_table(r: dict) -> list[str]:
    out = ["| seed | partition | FID composite (per set) | FID paragon (per set) | bits/dim comp / para | "
           "paragon steps (lr) | compartment steps (lr) | train s |", "|---|---|---|---|---|---|---|---|"]
    for x in r["seeds"]:
        out.append(f"| {x['seed']} | {x['partition']} | {', '.join(f'{v:.2f}' for v in x['sets']['fid']['composite'])} "
                   f"| {', '.join(f'{v:.2f}' for v in x['sets']['fid']['paragon'])} | {x['composite_bpd']:.4f} / "
                   f"{x['paragon_bpd']:.4f} | {x['paragon_steps']}{' (capped)' if x['paragon_capped'] else ''} "
                   f"({x['paragon_lr']:.2g}) | {', '.join(map(str, x['shard_steps']))} ({x['shard_lr'][0]:.2g}) | "
                   f"{x['train_seconds']:.0f} |")
    return out


def write_report(res: dict, path: str | Path) -> Path:
    s, d, b = res["settings"], res["data"], res["base"]
    lines = [
        "# Benchmark v3: compartments fine-tuned from a shared public base",
        "",
        f"Written by `{res['command']}` ({res['minutes']} min on {res['machine']['cpus']} CPUs, torch "
        f"{res['machine']['torch']}). Figures: `{Path(path).with_suffix('').name.lower()}.json`.",
        "",
    ]
    if res.get("interrupted"):
        lines += [f"**Interrupted:** {res['interrupted']}.", ""]
    if res.get("resumed"):
        kept = "; ".join(f"{k}: seeds {', '.join(map(str, v))}" for k, v in res["resumed"]["seeds_kept"].items())
        lines += [f"**Resumed** (`--resume`) from a run of {res['resumed']['from_minutes']} min that saved {kept}; "
                  "those seeds' records are kept as saved (the resumed run reproduced the settings, the base's "
                  "weights, the feature network and the floor exactly, or it would have refused).", ""]
    h = res.get("headline")
    if h:
        f, g = h["fid_ratio"], h["bpd_gap"]
        half = (f["high"] - f["low"]) / 2
        lines += [
            "## Headline",
            "",
            f"{h['row']}: **FID ratio {f['point']:.3f} [{f['low']:.3f}, {f['high']:.3f}]** (half-width {half:.3f}; "
            f"{f['seeds']} training seeds over partitions {h['partitions']}, {f['sets_per_model']} paired sample sets "
            f"per model), **bits/dim gap {g['point']:.4f} [{g['low']:.4f}, {g['high']:.4f}]** ({g['images']} held-out "
            f"images x {g['seeds']} seeds), gain kept from base to paragon: FID {ci(h['gain_kept']['fid'], digits=2)}, "
            f"bits/dim {ci(h['gain_kept']['bpd'], digits=2)}; compartments worse than the base: "
            f"**{h['compartments_worse_than_base']} of {h['compartments']}** ({h['worse_than_base_means']}; "
            f"{h['compartments_above_base_point']} have a point estimate above the base's).",
            "",
            f"Goals (issue #29): FID ratio {h['goals']['fid_ratio']}: **{'met' if h['met']['fid_ratio'] else 'not met'}**; "
            f"bits/dim gap {h['goals']['bpd_gap']}: **{'met' if h['met']['bpd_gap'] else 'not met'}**; zero "
            f"compartments worse than the base: **{'met' if h['met']['compartments_worse_than_base'] else 'not met'}**.",
            "",
        ]
    lines += [
        f"Data: {d['source']} at {d['image_size']}x{d['image_size']}, 256 grey levels; public {d['public']} "
        f"(the base and the classifier train on it), owners {d['owners']} (8 iid compartments), held-out "
        f"{d['validation']} for the plateau rule and {d['unseen']} never used in training "
        f"({d['nll_images']} of them scored by the likelihood bound).",
        "",
        "How the figures are measured. Each training seed trains a new paragon and 8 new compartments (partition = seed "
        f"mod {s['partitions']}) and draws {s['sets']} sample sets of {res['samples_per_set']} class-conditional images "
        "from each model (labels in the owners' proportions; the composite's `prior` draw allocated per label by "
        "systematic sampling, not a multinomial draw). Set j of the composite and set j of the paragon share their "
        "noise (common random numbers); no two seeds share any. FID is against a class-stratified half of the owners' "
        "images. Seeds are the independent units: a ratio is the ratio of grand means with a delete-one-seed "
        "jackknife interval (Student t, seeds - 1 df); the variance of each model's FID is split into its seed and "
        "set levels in the JSON (`fid_variance`). The bits/dim gap is per image, paired, over a seeds x images table "
        "with crossed random effects (both the seeds and the held-out images are samples). KID is on features "
        "standardized by the reference, as the composite's minus the paragon's (x1e3, paired by set); 0 means no "
        "difference. **Floor** (real vs real at the same N, from "
        f"{res['floor_real']['n']} disjoint real sets): {ci(res['floor_real'], digits=2)}; floor-subtracted FIDs "
        "carry its interval. The reference is the owners' own images, so FID and precision reward memorization as "
        "much as quality. Precision and recall: k-NN manifolds (k = 3) in the classifier's feature space. Class "
        f"accuracy: the independent classifier (public split only; {res['classifier_accuracy_on_unseen']:.3f} on the "
        "unseen digits) reading the conditional samples.",
        "",
        f"Base: {b['images']} public images, {b['steps']} steps to the plateau ({b['steps_run']} run"
        f"{', capped' if b['capped'] else ''}), FID {b['fid']:.2f} (mean of {len(b['sets']['fid'])} sets), "
        f"{b['bpd']:.4f} bits/dim on the held-out images. Plateau rule: held-out loss at step 0 (the base itself) and "
        f"every {res['plateau_rule']['every']} steps, stop after {res['plateau_rule']['patience']} evaluations "
        f"without a {res['plateau_rule']['min_delta']:.1%} gain, keep the best (caps: paragon {s['paragon_cap']}, "
        f"compartment {s['shard_cap']}, flagged when reached). Learning rate of a fine-tune on n images: "
        f"{s['ft_lr']} (n / {d['owners']})^{s['lr_power']} (full; LoRA {s['lora_lr']}, rank {s['lora_rank']}; "
        "the power chosen on held-out loss, `bench/lr_sweep.json`).",
        "",
        "## Composite (prior, 8 iid compartments) vs paragon",
        "",
        *row_table(res["rows"]),
        "",
    ]
    for r in res["rows"]:
        v = r["fid_variance"]
        lines += [f"### {r['kind']} {r['regime']}: per seed", "", *seed_table(r), "",
                  f"FID variance, seed level / set level: composite {v['composite']['seed']:.3f} / "
                  f"{v['composite']['set']:.3f}, paragon {v['paragon']['seed']:.3f} / {v['paragon']['set']:.3f}, "
                  f"ratio {v['ratio']['seed']:.5f} / {v['ratio']['set']:.5f}.", ""]
    lora = [r for r in res["rows"] if r.get("bytes_per_owner")]
    full = {(r["regime"], r["budget"]): r for r in res["rows"] if r["kind"] == "full"}
    for r in (r for r in res["rows"] if r["kind"] == "lora"):
        f = full.get((r["regime"], r["budget"]))
        seeds = [s["seed"] for s in r["seeds"]]
        if f and seeds == [s["seed"] for s in f["seeds"]]:
            from cdm.quality import paired_ratio

            x = paired_ratio([s["sets"]["fid"]["composite"] for s in r["seeds"]],
                             [s["sets"]["fid"]["paragon"] for s in f["seeds"]])
            lines += [f"In the LoRA row the paragon is itself a LoRA adapter on the base (like with like). Against the "
                      f"full fine-tuned paragon of the same seeds, the LoRA composite's FID ratio is "
                      f"**{ci(x.as_dict())}**.", ""]
    if lora:
        r = lora[0]
        lines += [f"LoRA compartments store {r['bytes_per_owner']:,} bytes per owner against {r['full_shard_bytes']:,} "
                  f"for a full shard ({r['bytes_per_owner'] / r['full_shard_bytes']:.1%}); the base is stored once.",
                  ""]
    if "forgetting" in res:
        f = res["forgetting"]
        lines += [f"## Forgetting (first seed, {s['forget_kind']} compartments at the plateau)", "",
                  f"Membership attack (low-t denoising loss) on compartment 0's {f['members']} images vs "
                  f"{f['nonmembers']} unseen: compartment alone {ci(f['auc_compartment_alone'])}; the composite "
                  f"scored as its draw's expected loss before dropping it {ci(f['auc_composite_before'])}, after "
                  f"{ci(f['auc_composite_after'])}; scored as the lowest loss over its compartments (an attacker who "
                  f"queries each, the platform's own check) before {ci(f['auc_min_over_compartments_before'])}, after "
                  f"{ci(f['auc_min_over_compartments_after'])}.", ""]
    if "memorization" in res:
        m = res["memorization"]
        mm, ma = m["memorization"], m["membership_auc"]
        lines += ["## Memorization and membership (a regime that memorizes)", "",
                  f"{m['members']} members ({m['per_class']} per class), every model {m['steps_per_model']} steps "
                  f"fine-tuned from the base; {m['samples']} samples per model, each sample checked against the same "
                  "reference (all members): share whose nearest member is 3x closer than the second nearest.", "",
                  "| model | memorization share | membership AUC [95%] | verdict |", "|---|---|---|---|",
                  f"| paragon | {mm['paragon']:.3f} | {ci(ma['paragon'])} | {m['membership_verdicts']['paragon']} |",
                  f"| composite (8 compartments; AUC of the draw's expected loss) | {mm['composite']:.3f} | "
                  f"{ci(ma['composite'])} | {m['membership_verdicts']['composite']} |",
                  f"| composite (AUC of the lowest loss over compartments) | | "
                  f"{ci(ma['composite_min_over_compartments'])} | "
                  f"{m['membership_verdicts']['composite_min_over_compartments']} |",
                  f"| compartments (each; AUC: compartment 0 on its own members) | "
                  f"{', '.join(f'{v:.2f}' for v in mm['compartments'])} | {ci(ma['compartment_0_own_members'])} | "
                  f"{m['membership_verdicts']['compartment_0_own_members']} |",
                  f"| positive control (24 images) | {mm['positive_control_24_images']:.3f} | "
                  f"{ci(ma['positive_control_24_images'])} | {m['membership_verdicts']['positive_control_24_images']} |",
                  f"| negative control (the base: never saw them) | {mm['negative_control_base']:.3f} | "
                  f"{ci(ma['negative_control_base'])} | {m['membership_verdicts']['negative_control_base']} |", "",
                  f"Controls as designed: memorization {m['controls_as_designed']['memorization']}, membership "
                  f"{m['controls_as_designed']['membership']}.", ""]
    Path(path).write_text("\n".join(lines))
    return Path(path)


if __name__ == "__main__":
    write_report(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
