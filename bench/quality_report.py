"""bench/QUALITY.md from bench/results.json: the answer first, then every row with its interval."""

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


def steps_of(g: dict) -> str:
    """Steps per shard: one number, or the median and range when each shard stopped at its own plateau."""
    st = g["steps_per_shard"]
    st = st if isinstance(st, list) else [st]
    return str(st[0]) if len(set(st)) == 1 else f"{int(np.median(st))} ({min(st)}-{max(st)})"


def acc(a: dict, t: int) -> float:
    return a.get(str(t), a.get(t, float("nan")))


def write_report(r: dict, path: str | Path) -> None:
    s = r["settings"]
    rule = r.get("plateau_rule", {})
    L = ["# What compartmentalization costs (benchmark v2)", "",
         f"`python bench/quality.py` — {r.get('minutes', '?')} min on {r['machine']['cpus']} CPUs "
         f"({r['machine']['platform']}, torch {r['machine']['torch']}). Settings: `{json.dumps(s)}`.", "",
         "Every FID is the mean over independent sample sets of "
         f"{r['n_per_set']} images with a 95% Student-t interval over the sets; ratios are paired set by set (same "
         "seed, same labels). The headline row (iid N = 8, `prior`, class-conditional) draws paired sets until its "
         f"ratio is known to +-{s.get('target', 0.03):.0%} or {s.get('max_sets')} sets. Class-conditional rows draw "
         "labels in the reference's class proportions. Noise floor (real vs real at the same N = "
         f"{r['n_per_set']}): FID {ci(r['floor_real'], '.2f')}; each model's own floor (two of its sample sets) is in "
         "the tables.",
         "NLL: variational bound in bits/dim on held-out digits no generator, feature network, stopping rule or "
         "router saw; the composite as the mixture log sum_i lambda_i(y) exp(ELBO_i); gaps are paired by image.",
         f"Regimes: *equal compute* (paragon {s['steps']} steps, each shard {s['steps']} / N) and *plateau* (every "
         "model, paragon included, trained until its held-out denoising loss — on public digits of its own classes "
         f"— stopped improving by {rule.get('min_delta', 0.01):.0%} for {rule.get('patience', 3)} evaluations "
         f"{rule.get('every', 100)} steps apart, cap {s.get('plateau_cap')}; the weights of its best evaluation).",
         "Training seed: " + ", ".join(str(x) for x in s["seeds"]) + " (the intervals hold the sampling noise; a "
         "second training seed is not in them).", "", "## The answer", ""]
    paras = {p.get("regime", "equal compute"): p for p in r["paragons"] if p["seed"] == s["seeds"][0]}
    for regime in ("equal compute", "plateau", "equal steps"):
        for part in ("iid", "by-class"):
            for est in ("prior", "path"):
                got = rows_of(r, regime=regime, partition=part, labels="conditional", estimator=est)
                if not got:
                    continue
                ratios = "; ".join(f"{ci(g['fid_ratio'])} (±{g['fid_ratio_half_width']:.1%}, {g['sets']} sets)"
                                   if "sets" in g else ci(g["fid_ratio"]) for g in got)
                para = paras.get(regime, {})
                L.append(f"- **{regime}, {part} N={got[0]['N']}, {est}, class-conditional**: FID ratio {ratios}; "
                         f"NLL gap {ci(got[0]['nll']['gap_bpd'])} bits/dim (paragon {ci(para.get('nll_bpd'))}); "
                         f"steps per shard {steps_of(got[0])}, paragon {para.get('steps', '?')}.")
    head = rows_of(r, regime="equal compute", partition="iid", labels="conditional", estimator="prior")
    if head and "fid_ratio_half_width" in head[0]:
        hw = head[0]["fid_ratio_half_width"]
        L += ["", f"- **Precision of the headline ratio** (equal compute, iid N=8, prior): ±{hw:.1%} with "
              f"{head[0]['sets']} paired sets — target ±{s.get('target', 0.03):.0%} "
              f"{'met' if hw <= s.get('target', 0.03) else 'NOT met'}."]
    if any(g["regime"] == "equal compute" for g in r["rows"]):
        choice, why = choose_default(r)
        L += [f"- **Default estimator: `{choice}`** by the stated rule ({why})."]
    c = r.get("controls", {})
    L += [f"- **Positive controls** (one shard over-fitted on {c.get('images')} images, {c.get('steps')} steps): "
          f"memorization share {c.get('memorization_share', float('nan')):.3f} "
          f"({'fires' if c.get('memorization_fires') else 'DOES NOT FIRE'}, threshold 0.5); membership AUC "
          f"{c.get('membership_auc', float('nan')):.3f} ({'fires' if c.get('membership_fires') else 'DOES NOT FIRE'}, "
          "needs >= 0.7; low-t denoising loss over 32 noise draws)."]
    f = r.get("forgetting")
    if f:
        L += [f"- **Forgetting** one of 8 iid owners (equal compute): composite without it FID "
              f"{ci(f['fid_composite_without'], '.2f')} vs the paragon retrained without it "
              f"{ci(f['fid_paragon_retrained'], '.2f')} (same reference: the remaining owners' data; real floor "
              f"{ci(f.get('floor_real'), '.2f')}): ratio {ci(f['ratio'])}; the retraining took "
              f"{f['paragon_retrain_seconds']} s; dropping the shard trains nothing. Membership AUC of the removed shard on its "
              f"own data before removal: {f['membership_auc_removed_shard_before']:.3f} (the attack's power on a "
              "regular shard: below 0.7 it cannot show that forgetting worked, so protection is not claimed from it)."]
    agree = r.get("attribution", [])
    if agree:
        L.append("- **Attribution** (by-class, unconditional, 300 samples; share whose final-weight argmax is the shard "
                 "of the digit the classifier reads; target >= 0.95): " + "; ".join(
                     f"{a['regime']}: path {a['path']:.3f}, router {a['router']:.3f}" for a in agree) + ".")
    L += ["", "## Memorization as training grows", "",
          "Share of generated samples whose nearest training image is much closer than the second nearest (< 1/3). "
          "Shards: 200 of their own samples against their own data; paragon and composites: sample set 0 against all "
          "owners' data.", "", "| model | regime | steps | memorization |", "|---|---|---|---|"]
    for p in r["paragons"]:
        if "memorization" in p:
            L.append(f"| paragon (all owners) | {p.get('regime', 'equal compute')} | {p['steps']} | "
                     f"{p['memorization']:.3f} |")
    seen = set()
    for g in r["rows"]:
        key = (g["regime"], g["partition"])
        if key in seen or "shard_memorization" not in g:
            continue
        seen.add(key)
        st = g["steps_per_shard"]
        for i, m in enumerate(g["shard_memorization"]):
            L.append(f"| {g['partition']} shard {i} ({g['shard_sizes'][i]} images) | {g['regime']} | "
                     f"{st[i] if isinstance(st, list) else st} | {m:.3f} |")
    L.append(f"| over-fitted control ({c.get('images')} images) | — | {c.get('steps')} | "
             f"{c.get('memorization_share', float('nan')):.3f} |")
    L += ["", "## Paragons", "", "| regime | seed | steps | FID conditional | FID unconditional | NLL bits/dim | "
          "seed floor (cond.) | loss drop, last quarter |", "|---|---|---|---|---|---|---|---|"]
    for p in r["paragons"]:
        L.append(f"| {p.get('regime', 'equal compute')} | {p['seed']} | {p['steps']} | {ci(p['fid_conditional'], '.2f')} | "
                 f"{ci(p['fid_unconditional'], '.2f')} | {ci(p['nll_bpd'])} | "
                 f"{ci(p['seed_floor_conditional'], '.2f')} | {p['plateau_last_quarter_drop']:.3f} |")
    L += ["", "## Composites", "",
          "| regime | partition | N | steps/shard | labels | estimator | seed | sets | FID | paragon FID | FID ratio | "
          "NLL gap bits/dim | memorization |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in r["rows"]:
        L.append(f"| {g['regime']} | {g['partition']} | {g['N']} | {steps_of(g)} | {g['labels']} | "
                 f"{g['estimator']} | {g['seed']} | {g.get('sets', '')} | {ci(g['fid'], '.2f')} | "
                 f"{ci(g.get('paragon_fid'), '.2f')} | {ci(g['fid_ratio'])} | {ci(g['nll']['gap_bpd'])} | "
                 f"{g['memorization']:.3f} |")
    L += ["", "## Router accuracy vs t", "",
          "By-class: on the unseen split (digits the router never saw), with the images' labels and with the null "
          "label (unconditional sampling). iid: on the router's own training images, since a held-out image belongs "
          "to no iid shard; the shards are exchangeable, so chance (1/N) is the right answer, and accuracy above it "
          "at low t means the router has learned which owner holds which training image.",
          "", "| regime | partition | labels | t=20 | t=100 | t=300 | t=600 | t=900 |", "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for g in r["rows"]:
        key = (g["regime"], g["partition"])
        if key in seen:
            continue
        seen.add(key)
        a = g["router_accuracy_vs_t"]
        for mode, accs in (a.items() if "conditional" in a else [("conditional", a)]):
            L.append(f"| {g['regime']} | {g['partition']} | {mode} | " +
                     " | ".join(f"{acc(accs, t):.2f}" for t in (20, 100, 300, 600, 900)) + " |")
    half = [g["fid_ratio_half_width"] for g in r["rows"] if "fid_ratio_half_width" in g
            and g["partition"] == "iid" and g["labels"] == "conditional"]
    if half:
        L += ["", f"Relative half-width of the iid conditional fid_ratio intervals: median {np.median(half):.1%}, "
              f"max {max(half):.1%}."]
    Path(path).write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results.json")
    write_report(json.loads(src.read_text()), src.parent / "QUALITY.md")
