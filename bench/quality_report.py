"""bench/QUALITY.md from bench/quality.json: the answer first, then every row with its interval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def ci(d: dict | None, spec: str = ".3f") -> str:
    return "n/a" if not d else f"{d['mean']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}]"


def rows_of(r: dict, **match) -> list[dict]:
    return [row for row in r["rows"] if all(row.get(k) == v for k, v in match.items())]


COST = {"prior": 1, "router": 2, "path": 3}  # shard evaluations per image-step: 1, sparse, dense-ish (cheapest first)


def choose_default(r: dict) -> tuple[str, str]:
    """The rule, fixed before the run: over the equal-compute, class-conditional rows of both partitions and all
    seeds, take each estimator's mean fid_ratio; among the estimators whose mean is within 2% of the best, or
    whose intervals overlap the best one's in every row, the cheapest to sample with wins."""
    rows = [g for g in r["rows"] if g["regime"] == "equal compute" and g["labels"] == "conditional"]
    ests = sorted({g["estimator"] for g in rows})
    mean = {e: float(np.mean([g["fid_ratio"]["mean"] for g in rows if g["estimator"] == e])) for e in ests}
    best = min(mean, key=mean.get)

    def overlaps(e):
        pairs = [(g, h) for g in rows if g["estimator"] == e for h in rows if h["estimator"] == best
                 and (h["partition"], h["seed"]) == (g["partition"], g["seed"])]
        return all(g["fid_ratio"]["low"] <= h["fid_ratio"]["high"] for g, h in pairs)

    tied = [e for e in ests if mean[e] <= 1.02 * mean[best] or overlaps(e)]
    choice = min(tied, key=lambda e: COST.get(e, 9))
    why = ("mean equal-compute conditional fid_ratio " + ", ".join(f"{e} {mean[e]:.3f}" for e in ests) +
           f"; within 2% of the best ({best}) or overlapping it: {', '.join(tied)}; cheapest: {choice}")
    return choice, why


def write_report(r: dict, path: str | Path) -> None:
    s = r["settings"]
    L = ["# What compartmentalization costs (benchmark v2)", "",
         f"`python bench/quality.py` — {r.get('minutes', '?')} min on {r['machine']['cpus']} CPUs "
         f"({r['machine']['platform']}, torch {r['machine']['torch']}). Settings: `{json.dumps(s)}`.", "",
         "Every FID is the mean over independent sample sets with a 95% Student-t interval over the sets; ratios are "
         "paired set by set (same seed, same labels). Class-conditional rows draw labels in the reference's class "
         f"proportions. Noise floor (real vs real at the same N = {r['n_per_set']}): FID {ci(r['floor_real'], '.2f')}.",
         "NLL: variational bound in bits/dim on held-out digits no generator, feature network or router saw; the "
         "composite as the mixture log sum_i lambda_i(y) exp(ELBO_i); gaps are paired by image.", "", "## The answer", ""]
    for regime in ("equal compute", "equal steps"):
        for part in ("iid", "by-class"):
            for est in ("prior", "path"):
                got = rows_of(r, regime=regime, partition=part, labels="conditional", estimator=est)
                if not got:
                    continue
                ratios = "; ".join(f"seed {g['seed']}: {ci(g['fid_ratio'])}" for g in got)
                gaps = "; ".join(f"seed {g['seed']}: {ci(g['nll']['gap_bpd'])}" for g in got)
                L.append(f"- **{regime}, {part} N={got[0]['N']}, {est}, class-conditional**: FID ratio {ratios}; "
                         f"NLL gap (bits/dim) {gaps}; {got[0]['steps_per_shard']} steps per shard.")
    if any(g["regime"] == "equal compute" for g in r["rows"]):
        choice, why = choose_default(r)
        L += ["", f"- **Default estimator: `{choice}`** by the stated rule ({why})."]
    c = r.get("controls", {})
    L += ["", f"- **Positive controls** (one shard over-fitted on {c.get('images')} images, {c.get('steps')} steps): "
          f"memorization share {c.get('memorization_share', float('nan')):.3f} "
          f"({'fires' if c.get('memorization_fires') else 'DOES NOT FIRE'}, threshold 0.5); membership AUC "
          f"{c.get('membership_auc', float('nan')):.3f} ({'fires' if c.get('membership_fires') else 'DOES NOT FIRE'}, "
          "needs >= 0.7; low-t denoising loss over 32 noise draws)."]
    f = r.get("forgetting")
    if f:
        L += [f"- **Forgetting** one of 8 iid owners: composite without it FID {ci(f['fid_composite_without'], '.2f')} "
              f"vs the paragon retrained without it {ci(f['fid_paragon_retrained'], '.2f')} (same reference: the "
              f"remaining owners' data): ratio {ci(f['ratio'])}; the retraining took {f['paragon_retrain_seconds']} s. "
              f"Membership AUC of the removed shard on its own data before removal: "
              f"{f['membership_auc_removed_shard_before']:.3f} (the attack's power on a regular shard)."]
    agree = r.get("attribution", [])
    if agree:
        L.append("- **Attribution** (by-class, unconditional, 300 samples; share whose final-weight argmax is the shard "
                 "of the digit the classifier reads; target >= 0.95): " + "; ".join(
                     f"{a['regime']} seed {a['seed']}: path {a['path']:.3f}, router {a['router']:.3f}" for a in agree))
    L += ["", "## Paragons", "", "| seed | steps | FID conditional | FID unconditional | NLL bits/dim | seed floor (cond.) | loss drop, last quarter |",
          "|---|---|---|---|---|---|---|"]
    for p in r["paragons"]:
        L.append(f"| {p['seed']} | {p['steps']} | {ci(p['fid_conditional'], '.2f')} | {ci(p['fid_unconditional'], '.2f')} | "
                 f"{ci(p['nll_bpd'])} | {ci(p['seed_floor_conditional'], '.2f')} | {p['plateau_last_quarter_drop']:.3f} |")
    L += ["", "## Composites", "",
          "| regime | partition | N | steps/shard | labels | estimator | seed | FID | FID ratio | NLL gap bits/dim | router acc. t=20/300/900 | memorization | loss drop |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in r["rows"]:
        acc = g["router_accuracy_vs_t"]
        L.append(f"| {g['regime']} | {g['partition']} | {g['N']} | {g['steps_per_shard']} | {g['labels']} | "
                 f"{g['estimator']} | {g['seed']} | {ci(g['fid'], '.2f')} | {ci(g['fid_ratio'])} | "
                 f"{ci(g['nll']['gap_bpd'])} | {acc.get('20', acc.get(20, 0)):.2f}/{acc.get('300', acc.get(300, 0)):.2f}/"
                 f"{acc.get('900', acc.get(900, 0)):.2f} | {g['memorization']:.3f} | {g['plateau_last_quarter_drop']:.3f} |")
    half = [(g["fid_ratio"]["high"] - g["fid_ratio"]["low"]) / 2 / g["fid_ratio"]["mean"] for g in r["rows"]
            if g["partition"] == "iid" and g["labels"] == "conditional"]
    if half:
        L += ["", f"Relative half-width of the iid conditional fid_ratio intervals: median {np.median(half):.1%}, "
              f"max {max(half):.1%}."]
    Path(path).write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "quality.json")
    write_report(json.loads(src.read_text()), src.parent / "QUALITY.md")
