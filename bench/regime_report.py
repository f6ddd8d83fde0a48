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
    out = ["| compartments | regime | seeds | FID composite | FID paragon | ratio | ratio, floor subtracted | "
           "bits/dim gap | KID (raw) comp / para | precision comp / para | recall comp / para | class acc. comp / para "
           "| steps: paragon; shards (mean) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        regime = r["regime"] + (f" B={r['budget']}" if r["budget"] else "")
        steps = "; ".join(f"{s['paragon_steps']}{'*' if s.get('paragon_capped') else ''}, "
                          f"{sum(s['shard_steps']) / len(s['shard_steps']):.0f}" for s in r["seeds"])
        out.append(
            f"| {r['kind']} | {regime} | {r['training_seeds']} | {ci(r['composite_fid'], digits=2)} | "
            f"{ci(r['paragon_fid'], digits=2)} | **{ci(r['fid_ratio'])}** | {ci(r['fid_minus_floor_ratio'])} | "
            f"{ci(r['bpd_gap'])} | {r['composite_kid']['mean']:.3g} / {r['paragon_kid']['mean']:.3g} | "
            f"{r['composite_precision']['mean']:.3f} / {r['paragon_precision']['mean']:.3f} | "
            f"{r['composite_recall']['mean']:.3f} / {r['paragon_recall']['mean']:.3f} | "
            f"{r['composite_class_accuracy']['mean']:.3f} / {r['paragon_class_accuracy']['mean']:.3f} | {steps} |")
    return out


def write_report(res: dict, path: str | Path) -> Path:
    s, d, b = res["settings"], res["data"], res["base"]
    lines = [
        "# Benchmark v3: compartments fine-tuned from a shared public base",
        "",
        f"Written by `{res['command']}` ({res['minutes']} min on {res['machine']['cpus']} CPUs, torch "
        f"{res['machine']['torch']}). Figures: `{Path(path).with_suffix('').name.lower()}.json`.",
        "",
        f"Data: {d['source']} at {d['image_size']}x{d['image_size']}, 256 grey levels; public {d['public']} "
        f"(the base and the classifier train on it), owners {d['owners']} (8 iid compartments), held-out "
        f"{d['validation']} for the plateau rule and {d['unseen']} never used in training "
        f"({d['nll_images']} of them scored by the likelihood bound).",
        "",
        f"Every FID is on {res['samples_per_set']} class-conditional samples (labels in the owners' proportions) "
        f"against a class-stratified half of the owners' images. **Floor** (real vs real at the same N): "
        f"{ci(res['floor_real'], digits=2)}; floor-subtracted FIDs remove it. The reference is the owners' own "
        "images (what the paragon and the compartments train on), so FID, KID and precision reward memorization as "
        "much as quality: read them beside the memorization rows. Intervals over training seeds are Student-t 95% "
        "intervals; each seed trains new compartments and paragons and draws new samples, so they hold that "
        "training and sampling variance (the base, the classifier and the floor are fixed across seeds). Ratios are ratios of means (not means of ratios). KID is the raw unbiased MMD^2 (cubic kernel on the 64 classifier features; not x1e3). Precision and "
        "recall: k-NN manifolds (k = 3) in the classifier's feature space. Class accuracy: the independent classifier "
        f"(public split only; {res['classifier_accuracy_on_unseen']:.3f} on the unseen digits) reading the "
        "conditional samples.",
        "",
        f"Base: {b['images']} public images, {b['steps']} steps to the plateau ({b['steps_run']} run"
        f"{', capped' if b['capped'] else ''}), FID {b['fid']:.2f}, {b['bpd']:.3f} bits/dim on the held-out images. "
        f"Plateau rule: held-out loss every {res['plateau_rule']['every']} steps, stop after "
        f"{res['plateau_rule']['patience']} evaluations without a new minimum, keep the best (caps: paragon "
        f"{s['paragon_cap']}, compartment {s['shard_cap']}; `*` marks a capped paragon). Learning rates: scratch "
        f"{s['lr']}, full fine-tune {s['ft_lr']}, LoRA {s['lora_lr']} (rank {s['lora_rank']}).",
        "",
        "## Composite (prior, 8 iid compartments) vs paragon",
        "",
        *row_table(res["rows"]),
        "",
    ]
    lora = [r for r in res["rows"] if r.get("bytes_per_owner")]
    full = {(r["regime"], r["budget"]): r for r in res["rows"] if r["kind"] == "full"}
    for r in (r for r in res["rows"] if r["kind"] == "lora"):
        f = full.get((r["regime"], r["budget"]))
        seeds = [s["seed"] for s in r["seeds"]]
        if f and seeds == [s["seed"] for s in f["seeds"]]:
            from cdm.quality import ratio_of_means

            x = ratio_of_means([s["composite_fid"] for s in r["seeds"]], [s["paragon_fid"] for s in f["seeds"]])
            lines += [f"In the LoRA row the paragon is itself a LoRA adapter on the base (like with like). Against the "
                      f"full fine-tuned paragon of the same seeds, the LoRA composite's FID ratio is "
                      f"**{ci(x.as_dict())}**.", ""]
    if lora:
        r = lora[0]
        lines += [f"LoRA compartments store {r['bytes_per_owner']:,} bytes per owner against {r['full_shard_bytes']:,} "
                  f"for a full shard ({r['bytes_per_owner'] / r['full_shard_bytes']:.1%}); the base is stored once.",
                  ""]
    lines += ["Goal (issue): FID ratio <= 1.05 and bits/dim gap <= 0.05 for full fine-tunes, <= 1.10 for LoRA. "
              "Read the interval: a ratio whose interval holds the goal has not been shown to miss it, nor to meet it.",
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
