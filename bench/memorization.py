"""Memorization and membership, designed to test the claim (issue #29 item 4): do compartments, each trained on an
eighth of the data, copy and leak their owners' images more than one model trained on all of it?

    python bench/memorization.py                 # `make bench-memorization`: bench/memorization.json, MEMORIZATION.md
    python bench/memorization.py --quick         # a smoke run of every code path (numbers meaningless)
    python bench/memorization.py --resume        # after a stop: the seeds saved in memorization.partial.json stay

A regime small enough to memorize (`--per-class` owners' images per class, fine-tuned from the public base of
`bench/regime.py`), per training seed (>= 3):

- the paragon on all members for `--steps` steps (batch 64);
- 8 iid compartments in two arms: **equal epochs** (each image seen as often as in the paragon: compartment steps
  = paragon epochs x n_i / batch_i) and **equal steps** (the paragon's step budget split over the 8: what the
  equal-compute regime of the headline benchmark gives each);
- **duplicates across owners**: `--duplicates` members (one per class) are given to two owners, so the paragon sees
  them twice and two compartments see them once each; the per-image extraction probability (the share of samples
  whose flagged nearest member is that image) is reported for duplicated and for single images;
- controls on the same images: positive, a model over-fitted on 24 members; negative, the base (saw none of them).

Memorization: the share of samples whose nearest member is closer than `r` times the second nearest, swept over r,
with Wilson intervals per seed and a t interval over seeds. Membership: AUC of members vs unseen images (score
interval, `cdm.metrics.auc_interval_of`) for the paragon (its ELBO), the composite through its own likelihood
(the mixture `log sum_i lambda_i(y) exp ELBO_i`, what the composite is as a density), and the composite as an
attacker who queries each compartment (the lowest low-t denoising loss); every AUC is read as a paired difference
to the negative control's on the same images, over seeds.

Every seed scores the same 100 members and 100 non-members (and the base control is one model), so each
"minus the control" difference is read with a two-way bootstrap over seeds and images (`crossed_bootstrap`): a
t interval over seeds alone would leave out the image-sampling noise of an AUC. The equal-epochs and equal-steps
arms differ only in the compartments' steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.regime import SCHEDULE, Bench, base_unet, log  # noqa: E402
from cdm.compose import class_priors  # noqa: E402
from cdm.data import Dataset, partition  # noqa: E402
from cdm.likelihood import BoundConfig, elbo, mixture_elbo  # noqa: E402
from cdm.metrics import auc, auc_interval_of, membership_loss  # noqa: E402
from cdm.model import UNetDenoiser  # noqa: E402
from cdm.quality import stratified_labels, t_interval  # noqa: E402
from cdm.schedulers import train_scheduler  # noqa: E402

N_OWNERS = 8
RATIOS = (0.25, 1 / 3, 0.5)


def concat(parts: list[Dataset]) -> Dataset:
    return Dataset(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), sum((p.ids for p in parts), []))


def nearest(samples: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d1 / d2 [N], index of the nearest member [N]) over distinct member images."""
    d = torch.cdist(samples.flatten(1).double(), members.flatten(1).double())
    two = d.topk(2, dim=1, largest=False)
    return two.values[:, 0] / two.values[:, 1].clamp(min=1e-12), two.indices[:, 0]


def seed_run(bench: Bench, base: dict, members: Dataset, nonmembers: Dataset, dup: list[int], seed: int) -> dict:
    a = bench.args
    idx = partition(members.y.numpy(), N_OWNERS, "iid", seed=seed)
    owner_of = {int(i): k for k, ix in enumerate(idx) for i in ix}
    shards = [members.subset(torch.as_tensor(ix)) for ix in idx]
    for i in dup:  # a duplicated image also goes to the next owner
        other = (owner_of[i] + 1) % N_OWNERS
        shards[other] = concat([shards[other], members.subset(torch.tensor([i]))])
    union = concat(shards)  # the paragon's data: the owners' data together (duplicates twice)
    epochs = a.steps * 64 / len(union)
    t0 = time.perf_counter()
    para, _ = bench.fit(union, "full", seed, a.steps, False, base, lr=a.ft_lr)
    arms = {}
    for arm in ("equal_epochs", "equal_steps"):
        unets = []
        for k, d in enumerate(shards):
            b = min(64, len(d))
            steps = max(1, round(epochs * len(d) / b)) if arm == "equal_epochs" else max(1, a.steps // N_OWNERS)
            unets.append(bench.fit(d, "full", seed * 100 + k + 1, steps, False, base, batch=b, lr=a.ft_lr)[0])
        arms[arm] = unets
    small = members.subset(torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))[:24])
    control, _ = bench.fit(small, "full", seed + 7, a.steps, False, base, batch=24, lr=a.ft_lr)
    train_s = time.perf_counter() - t0
    counts = torch.stack([d.class_counts(10) for d in shards]).float()
    labels = stratified_labels(members.class_counts(10), a.samples)
    base_net = base_unet(bench, base)
    models = {"paragon": UNetDenoiser(para, bench.null),
              **{f"composite_{arm}": bench.composite(u, counts, seed) for arm, u in arms.items()},
              "positive_control": UNetDenoiser(control, bench.null),
              "negative_control_base": UNetDenoiser(base_net, bench.null)}
    out: dict = {"seed": seed, "train_seconds": round(train_s, 1), "paragon_epochs": epochs,
                 "compartment_steps": {"equal_epochs": [max(1, round(epochs * len(d) / min(64, len(d)))) for d in shards],
                                       "equal_steps": a.steps // N_OWNERS},
                 "memorization": {}, "extraction": {}, "membership": {}}
    single = [i for i in range(len(members)) if i not in dup]
    for name, den in models.items():
        lab = small.y.repeat(a.samples // 24 + 1)[: a.samples] if name == "positive_control" else labels
        x = bench.sample(den, lab, 7000 + seed)
        ratio, near = nearest(x, members.x)
        out["memorization"][name] = {f"{r:.3f}": float((ratio < r).float().mean()) for r in RATIOS}
        flagged = near[ratio < 1 / 3]
        hits = torch.bincount(flagged, minlength=len(members)).double() / len(x)  # per-image extraction probability
        out["extraction"][name] = {"duplicated": float(hits[dup].mean()), "single": float(hits[single].mean())}
    # Membership: ELBO-based for one model, the mixture likelihood for a composite (its density), and the lowest
    # low-t loss over compartments (an attacker querying each one).
    cfg = BoundConfig(steps=a.nll_steps)
    x_all = concat([members, nonmembers])
    n_m = len(members)

    def auc_of(score: torch.Tensor) -> float:  # higher score: member
        return auc(score[:n_m].numpy(), score[n_m:].numpy())

    def elbo_of(u) -> torch.Tensor:
        return elbo(UNetDenoiser(u, bench.null), x_all.x, x_all.y, SCHEDULE, cfg)

    ac = train_scheduler(SCHEDULE).alphas_cumprod
    mem, scores = out["membership"], out.setdefault("scores", {})

    def put(key: str, score: torch.Tensor) -> None:  # per-image scores kept for the bootstrap over images
        scores[key] = [round(float(v), 6) for v in score]
        mem[key] = auc_of(score)

    put("paragon_elbo", elbo_of(para))
    put("negative_control_base_elbo", elbo_of(base_net))
    e_ctl = elbo_of(control).numpy()  # its own 24 members vs the same non-members
    mem["positive_control_elbo"] = auc(e_ctl[:n_m][_positions(members, small)], e_ctl[n_m:])
    for arm, unets in arms.items():
        e = torch.stack([elbo_of(u) for u in unets])
        put(f"composite_{arm}_mixture_elbo", mixture_elbo(e, class_priors(counts)[:, x_all.y].double().log()))
        loss = torch.stack([membership_loss(UNetDenoiser(u, bench.null), x_all.x, x_all.y, ac) for u in unets])
        put(f"composite_{arm}_min_loss", -loss.min(0).values)
    put("negative_control_base_min_loss", -membership_loss(UNetDenoiser(base_net, bench.null), x_all.x, x_all.y, ac))
    out["run_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"seed {seed}: memorization {out['memorization']} extraction {out['extraction']} membership {mem} "
        f"({train_s:.0f} s training)")
    return out


def _positions(members: Dataset, small: Dataset) -> list[int]:
    where = {k: i for i, k in enumerate(members.ids)}
    return [where[k] for k in small.ids]


def summarize(runs: list[dict], n_members: int, n_nonmembers: int) -> dict:
    out: dict = {"memorization": {}, "extraction": {}, "membership": {}, "membership_minus_control": {}}
    for name in runs[0]["memorization"]:
        out["memorization"][name] = {r: t_interval([x["memorization"][name][r] for x in runs]).as_dict()
                                     for r in runs[0]["memorization"][name]}
        out["extraction"][name] = {k: t_interval([x["extraction"][name][k] for x in runs]).as_dict()
                                   for k in ("duplicated", "single")}
    for key in runs[0]["membership"]:
        values = [x["membership"][key] for x in runs]
        per_seed = [auc_interval_of(v, n_members if "positive" not in key else 24, n_nonmembers).as_dict()
                    for v in values]
        out["membership"][key] = {"over_seeds": t_interval(values).as_dict(), "per_seed": per_seed}
        if "control" not in key:
            ctl = "negative_control_base_min_loss" if key.endswith("min_loss") else "negative_control_base_elbo"
            d = crossed_bootstrap(runs, key, ctl, n_members)
            out["membership_minus_control"][key] = {
                **d, "verdict": "leaks beyond the control" if d["low"] > 0 else
                "no leak beyond the control detected" if d["high"] >= 0 else "below the control"}
    pos = out["membership"]["positive_control_elbo"]["per_seed"]
    out["positive_control_fired"] = {
        "membership": all(p["low"] > c["high"] for p, c in zip(pos, out["membership"]["negative_control_base_elbo"]["per_seed"])),
        "memorization": all(x["memorization"]["positive_control"]["0.333"] >= 0.5 for x in runs)}
    return out


def crossed_bootstrap(runs: list[dict], key: str, ctl: str, n_members: int, reps: int = 1000) -> dict:
    """AUC(attack) - AUC(control) averaged over seeds, with a 95% percentile interval from a two-way bootstrap:
    each replicate redraws the seeds and, once for all of them, the members and the non-members (the same images
    are scored in every seed: a crossed design), so the interval carries both the training noise and the
    image-sampling noise of an AUC. Attack and control are scored on the same draw (paired)."""
    rng = np.random.default_rng(0)
    a = np.array([x["scores"][key] for x in runs])  # [seeds, members + non-members]
    c = np.array([x["scores"][ctl] for x in runs])
    n_s, n_non = len(runs), a.shape[1] - n_members

    def diff(seeds: np.ndarray, im: np.ndarray, inn: np.ndarray) -> float:
        return float(np.mean([auc(a[s, im], a[s, inn]) - auc(c[s, im], c[s, inn]) for s in seeds]))

    point = diff(np.arange(n_s), np.arange(n_members), n_members + np.arange(n_non))
    reps_ = [diff(rng.integers(0, n_s, n_s), rng.integers(0, n_members, n_members),
                  n_members + rng.integers(0, n_non, n_non)) for _ in range(reps)]
    low, high = np.percentile(reps_, [2.5, 97.5])
    return {"mean": point, "low": float(low), "high": float(high), "n": n_s,
            "method": f"two-way (seeds x images) percentile bootstrap, {reps} replicates"}


def write_report(res: dict, path: Path) -> None:
    def ci(d: dict, digits: int = 3) -> str:
        return f"{d['mean']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"

    s = res["summary"]
    lines = ["# Memorization and membership (issue #29 item 4)", "",
             f"Written by `{res['command']}` ({res['minutes']} min"
             + (f"; seeds {res['resumed_seeds']} kept from the stopped run it resumed" if res.get("resumed_seeds") else "")
             + f"; per seed, minutes: {res.get('seed_minutes')}). Figures: `memorization.json`. "
             f"{res['members']} members ({res['settings']['per_class']} per class; {len(res['duplicated'])} of them "
             f"given to two owners), {res['nonmembers']} unseen non-members, {len(res['runs'])} training seeds; "
             f"paragon {res['settings']['steps']} steps at batch 64 ({res['runs'][0]['paragon_epochs']:.0f} epochs). "
             "Intervals: Student t over seeds; differences to the control: a two-way bootstrap over seeds and "
             "images.", "",
             f"Positive controls fired: membership {s['positive_control_fired']['membership']}, memorization "
             f"{s['positive_control_fired']['memorization']}.", "",
             "## Memorization share (nearest member closer than r x the second nearest)", "",
             "| model | " + " | ".join(f"r = {r}" for r in next(iter(s["memorization"].values()))) +
             " | extraction p, duplicated image | extraction p, single image |",
             "|---|" + "---|" * (len(RATIOS) + 2)]
    for name, row in s["memorization"].items():
        e = s["extraction"][name]
        lines.append(f"| {name} | " + " | ".join(ci(v) for v in row.values()) +
                     f" | {ci(e['duplicated'], 4)} | {ci(e['single'], 4)} |")
    lines += ["", "## Membership AUC (members vs unseen), and its difference to the base on the same images", "",
              "The t interval over seeds has no width where every seed scores the same (AUC 1.000 in each): the next "
              "column is each seed's own score interval over its images (the widest bounds of the seeds), which "
              "keeps the image-sampling noise at the boundary.", "",
              "| attack | AUC over seeds | one seed's images (score interval, widest) | minus the negative control | "
              "verdict |", "|---|---|---|---|---|"]
    for key, v in s["membership"].items():
        d = s["membership_minus_control"].get(key)
        per = v["per_seed"]
        seeds = f"[{min(p['low'] for p in per):.3f}, {max(p['high'] for p in per):.3f}]"
        lines.append(f"| {key} | {ci(v['over_seeds'])} | {seeds} | {ci(d) if d else ''} | "
                     f"{d['verdict'] if d else 'control'} |")
    path.write_text("\n".join(lines) + "\n")


def rewrite_report() -> None:
    """The report again from bench/memorization.json (`--report-only`: no training)."""
    path = Path(__file__).parent / "memorization.json"
    write_report(json.loads(path.read_text()), Path(__file__).parent / "MEMORIZATION.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-class", type=int, default=10, help="members per class")
    ap.add_argument("--duplicates", type=int, default=10, help="members given to two owners (one per class first)")
    ap.add_argument("--steps", type=int, default=1500, help="the paragon's steps (batch 64)")
    ap.add_argument("--ft-lr", type=float, default=1e-3, help="learning rate of every fine-tune here")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--nll-steps", type=int, default=20)
    ap.add_argument("--base-cache", default="", help="the base of bench/regime.py (same settings), reused")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep the seeds a stopped run with the same settings saved (bench/memorization.partial.json)")
    args = ap.parse_args()
    # Bench's own settings: only what its constructor and `fit`/`sample` read.
    if args.quick:
        args.seeds, args.steps, args.samples, args.nll_steps = [0, 1], 40, 48, 5
    # Bench's own settings (what its constructor, `fit` and `sample` read; the base's as in bench/regime.py) and ours.
    ns = argparse.Namespace(**{**vars(args), "image_size": 16, "every": 100, "patience": 3, "min_delta": 0.002,
                               "classifier_steps": 100 if args.quick else 1500, "sets": 1, "nll_images": 50,
                               "sampling_steps": 10 if args.quick else 50, "lora_rank": 8, "lr": 2e-3,
                               "lora_lr": 2e-3, "lr_power": 0.0, "base_cap": 60 if args.quick else 4000})
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    bench = Bench(ns)
    from bench.regime import train_base

    unet, _ = train_base(bench, args.base_cache)
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(11)
    pick = torch.cat([(bench.owners.y == c).nonzero().flatten()[torch.randperm(int((bench.owners.y == c).sum()),
                      generator=g)[: args.per_class]] for c in range(10)])
    members = bench.owners.subset(pick)
    nonmembers = bench.unseen.subset(torch.randperm(len(bench.unseen), generator=g)[: len(members)])
    dup = [int((members.y == c).nonzero()[0]) for c in range(10)][: args.duplicates]
    # Each finished seed is saved before the next one trains: a stopped run resumes (--resume) where it stopped.
    partial = Path(__file__).parent / ("memorization.quick.partial.json" if args.quick else "memorization.partial.json")
    same = {k: v for k, v in vars(args).items() if k != "resume"}
    kept = {}
    if args.resume and partial.exists():
        saved = json.loads(partial.read_text())
        if saved["settings"] == same and saved["members"] == members.ids:
            kept = {r["seed"]: r for r in saved["runs"]}
        log(f"resume: keeping seeds {sorted(kept)}" if kept else "resume: the saved run differs; starting anew")
    runs = []
    for s in args.seeds:
        runs.append(kept.get(s) or seed_run(bench, base, members, nonmembers, dup, s))
        partial.write_text(json.dumps({"settings": same, "members": members.ids, "runs": runs}) + "\n")
    res = {"command": "python bench/memorization.py " + " ".join(sys.argv[1:]), "settings": vars(args),
           "members": len(members), "nonmembers": len(nonmembers), "duplicated": dup, "runs": runs,
           "summary": summarize(runs, len(members), len(nonmembers)),
           "minutes": round((time.perf_counter() - T0) / 60, 1), "resumed_seeds": sorted(kept),
           "seed_minutes": {r["seed"]: round(r["run_seconds"] / 60, 1) for r in runs if "run_seconds" in r}}
    name = "memorization.quick" if args.quick else "memorization"
    (Path(__file__).parent / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, Path(__file__).parent / f"{name.upper()}.md")
    log("wrote", name)


T0 = time.perf_counter()

if __name__ == "__main__":
    rewrite_report() if sys.argv[1:] == ["--report-only"] else main()
