"""Benchmark v2: what compartmentalization costs, measured with the quality instrument (cdm/quality.py) and the
likelihood bound (cdm/likelihood.py), with positive controls before any protection figure.

Writes bench/quality.json and bench/QUALITY.md (the report opens with the answer).

    python bench/quality.py [--steps 1200] [--seeds 0 1] [--samples 400] [--sets 5] [--out bench]

Rows: equal-size iid shards (N = 8) and by-class shards (N = 5, two digits each); class-conditional sampling with
labels in the reference's class proportions, and unconditional sampling as a second row. Two regimes: equal total
compute (paragon S steps, each shard S / N) and equal steps per model (each shard S, seed 0). Every FID is the mean
over `--sets` independent sample sets with a 95% interval; ratios are paired set by set (same seed and labels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdm.compose import CompositeDenoiser, RouterConfig, class_priors, train_router  # noqa: E402
from cdm.data import Dataset, digits_dataset, digits_uint8, heldout_split  # noqa: E402
from cdm.likelihood import BoundConfig, bits_per_dim, elbo, mixture_elbo  # noqa: E402
from cdm.metrics import auc, denoising_loss, memorization, train_feature_net  # noqa: E402
from cdm.model import ModelConfig, UNetDenoiser  # noqa: E402
from cdm.pipeline import CDMPipeline  # noqa: E402
from cdm.quality import (features, fid_interval, paired_interval, ratio_interval, real_floor,  # noqa: E402
                         seed_floor, stratified_halves, stratified_labels)
from cdm.schedulers import NoiseSchedule, sampling_scheduler, train_scheduler  # noqa: E402
from cdm.train import TrainConfig, train_shard  # noqa: E402

CFG = ModelConfig.preset("tiny")
NULL = CFG.null_label
SCHEDULE = NoiseSchedule()
MEMBERSHIP_T, MEMBERSHIP_DRAWS = (5, 10, 20, 40), 32  # low-t denoising loss over 32 noise draws per image
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def fit(data: Dataset, steps: int, seed: int, batch: int = 64, label_dropout: float = 0.15):
    r = train_shard(data, CFG, TrainConfig(steps=steps, seed=seed, batch_size=batch, label_dropout=label_dropout),
                    SCHEDULE, progress=False)
    return r.unet.eval(), r


def plateau(result) -> float:
    """Relative drop of the smoothed training loss over the last quarter of training (small: on a plateau)."""
    losses = result.smoothed_losses()
    q = max(1, len(losses) // 4)
    return float((losses[-q - 1] - losses[-1]) / losses[-q - 1])


def partitions(owners: Dataset, seed: int) -> dict[str, list[torch.Tensor]]:
    """Equal-size iid shards (8) and by-class shards (5: digits {0,1}, {2,3}, ...), as index tensors."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(owners), generator=g)
    iid = list(perm[: len(perm) // 8 * 8].chunk(8))
    by_class = [torch.isin(owners.y, torch.tensor([2 * k, 2 * k + 1])).nonzero().flatten() for k in range(5)]
    return {"iid": iid, "by-class": by_class}


class Scorer:
    """Scores image sets and denoisers against one reference, with cached reference features."""

    def __init__(self, owners: Dataset, unseen: Dataset, net, n: int, sets: int, steps: int, nll_steps: int):
        self.owners, self.unseen, self.net, self.sets, self.steps = owners, unseen, net, sets, steps
        ref, ctl = stratified_halves(owners.y)
        self.ref_x, self.f_ref, self.f_ctl = owners.x[ref], features(net, owners.x[ref]), features(net, owners.x[ctl])
        self.ctl_y = owners.y[ctl].numpy()
        self.n = min(n, len(ctl))
        self.cond = stratified_labels(owners.y[ref].bincount(minlength=NULL), self.n)
        self.uncond = torch.full((self.n,), NULL)
        self.bound = BoundConfig(steps=nll_steps)
        self.floor = real_floor(self.f_ref, self.f_ctl, self.ctl_y, self.n)

    def sample_sets(self, make, labels) -> list[torch.Tensor]:
        out = []
        for s in range(self.sets):
            den, sched = make(s)
            out.append(CDMPipeline(den, sched, (1, 8, 8))(labels, self.steps, generator=torch.Generator().manual_seed(s)))
        return out

    def feats(self, sets):
        return [features(self.net, x) for x in sets]

    def elbo(self, unet) -> torch.Tensor:
        return elbo(UNetDenoiser(unet, NULL), self.unseen.x, self.unseen.y, SCHEDULE, self.bound)


def composite_maker(unets, counts, estimator, router=None):
    priors = class_priors(counts)

    def make(seed):
        sched = sampling_scheduler(SCHEDULE)
        return CompositeDenoiser([UNetDenoiser(u, NULL) for u in unets], priors, estimator, scheduler=sched,
                                 router=router, generator=torch.Generator().manual_seed(seed)), sched
    return make


def single_maker(unet):
    return lambda seed: (UNetDenoiser(unet, NULL), sampling_scheduler(SCHEDULE))


def router_accuracy(router, data: Dataset, shard_of: torch.Tensor) -> dict[int, float]:
    """The router's accuracy on noised samples with their own labels, at several t."""
    noise = train_scheduler(SCHEDULE)
    g = torch.Generator().manual_seed(5)
    out = {}
    for t in (20, 100, 300, 600, 900):
        eps = torch.randn(data.x.shape, generator=g)
        tt = torch.full((len(data),), t)
        with torch.no_grad():
            pred = router(noise.add_noise(data.x, eps, tt), tt, data.y).argmax(1)
        out[t] = float((pred == shard_of).float().mean())
    return out


def quality_rows(args, sc: Scorer, owners: Dataset, seed: int, part: str, idx: list[torch.Tensor], regime: str,
                 steps_per_shard: int, results: dict, para_feats: dict, para_elbo: torch.Tensor):
    """Train one partition's shards, then score every estimator and label mode against the paragon."""
    n = len(idx)
    shards, plateaus = [], []
    t0 = time.perf_counter()
    for i, ix in enumerate(idx):
        unet, r = fit(owners.subset(ix), steps_per_shard, seed * 100 + i)
        shards.append(unet)
        plateaus.append(plateau(r))
    train_s = time.perf_counter() - t0
    counts = torch.stack([owners.subset(ix).class_counts(10) for ix in idx]).float()
    shard_of = torch.cat([torch.full((len(ix),), i) for i, ix in enumerate(idx)])
    union = owners.subset(torch.cat(idx))
    router, _ = train_router(union, shard_of, n, 10, RouterConfig(steps=args.router_steps, seed=seed))
    # Likelihood: shards and the mixture on the unseen split (labels: the images' own).
    shard_elbos = torch.stack([sc.elbo(u) for u in shards])
    mix = mixture_elbo(shard_elbos, class_priors(counts)[:, sc.unseen.y].double().log())
    dims = 64
    nll = {"composite_bpd": paired_interval(bits_per_dim(mix, dims), torch.zeros(len(mix))).as_dict(),
           "shards_bpd_mean": float(bits_per_dim(shard_elbos, dims).mean()),
           "gap_bpd": paired_interval(bits_per_dim(mix, dims), bits_per_dim(para_elbo, dims)).as_dict()}
    row_base = {"seed": seed, "regime": regime, "partition": part, "N": n, "steps_per_shard": steps_per_shard,
                "shard_sizes": [len(ix) for ix in idx], "train_seconds": round(train_s, 1),
                "plateau_last_quarter_drop": float(np.mean(plateaus)), "nll": nll,
                "router_accuracy_vs_t": router_accuracy(router, union, shard_of)}
    for mode, labels in (("conditional", sc.cond), ("unconditional", sc.uncond)):
        for est in args.estimators:
            make = composite_maker(shards, counts, est, router if est == "router" else None)
            t1 = time.perf_counter()
            sets = sc.sample_sets(make, labels)
            f = sc.feats(sets)
            fid = fid_interval(sc.f_ref, f)
            ratio = ratio_interval(sc.f_ref, f, para_feats[mode])
            row = {**row_base, "labels": mode, "estimator": est, "fid": fid.as_dict(), "fid_ratio": ratio.as_dict(),
                   "seed_floor": seed_floor(f).as_dict(), "memorization": memorization(sets[0], owners.x)["share"],
                   "sample_seconds": round(time.perf_counter() - t1, 1)}
            results["rows"].append(row)
            log(f"{regime} seed {seed} {part} N={n} {mode} {est}: FID {fid} ratio {ratio} NLL gap "
                f"{nll['gap_bpd']['mean']:.3f}")
    if part == "by-class":
        agree = {est: attribution_agreement(composite_maker(shards, counts, est, router if est == "router" else None),
                                            sc, idx, owners) for est in ("path", "router")}
        results.setdefault("attribution", []).append({"seed": seed, "regime": regime, **agree})
        log(f"{regime} seed {seed} attribution agreement:", agree)
    return shards, counts


def attribution_agreement(make, sc: Scorer, idx, owners: Dataset) -> float:
    """Share of unconditional samples whose final-weight argmax is the shard of the digit the classifier reads."""
    comp, sched = make(0)
    x = CDMPipeline(comp, sched, (1, 8, 8))(sc.uncond[:300], sc.steps, generator=torch.Generator().manual_seed(0))
    read = sc.net.predict(x)
    shard_of_class = torch.zeros(10, dtype=torch.long)
    for i, ix in enumerate(idx):
        shard_of_class[owners.y[ix].unique()] = i
    return float((comp.attribution()["final"].argmax(1) == shard_of_class[read]).float().mean())


def membership(unet, members: Dataset, nonmembers: Dataset) -> float:
    """AUC of the low-t denoising-loss attack (lower loss: member), conditional labels, 32 draws per image."""
    ac = train_scheduler(SCHEDULE).alphas_cumprod
    den = UNetDenoiser(unet, NULL)
    lm = denoising_loss(den, members.x, members.y, ac, MEMBERSHIP_T, MEMBERSHIP_DRAWS // len(MEMBERSHIP_T))
    ln = denoising_loss(den, nonmembers.x, nonmembers.y, ac, MEMBERSHIP_T, MEMBERSHIP_DRAWS // len(MEMBERSHIP_T))
    return auc(-lm.numpy(), -ln.numpy())


def controls(args, sc: Scorer, owners: Dataset, unseen_private: Dataset) -> dict:
    """Positive controls: a shard over-fitted on 24 images must be flagged by memorization and by membership."""
    g = torch.Generator().manual_seed(7)
    small = owners.subset(torch.randperm(len(owners), generator=g)[:24])
    unet, r = fit(small, args.overfit_steps, 7, batch=24, label_dropout=0.0)
    x = CDMPipeline(UNetDenoiser(unet, NULL), sampling_scheduler(SCHEDULE), (1, 8, 8))(
        small.y.repeat(8), sc.steps, generator=torch.Generator().manual_seed(0))
    mem = memorization(x, small.x)["share"]
    nonmembers = unseen_private.subset(torch.randperm(len(unseen_private), generator=g)[:24])
    out = {"images": 24, "steps": args.overfit_steps, "train_seconds": round(r.seconds, 1),
           "memorization_share": mem, "memorization_fires": mem >= 0.5,
           "membership_auc": membership(unet, small, nonmembers)}
    out["membership_fires"] = out["membership_auc"] >= 0.7
    log("controls:", out)
    return out


def forgetting(args, sc_after: Scorer, owners: Dataset, seed: int, shards, idx, counts, steps: int) -> dict:
    """Drop shard 0 of the iid partition: the composite without it vs a paragon retrained without its data, both
    scored against the same reference (the remaining owners' data)."""
    keep = torch.cat(idx[1:])
    t0 = time.perf_counter()
    paragon_wo, _ = fit(owners.subset(keep), steps * 7 // 8, seed + 50)
    retrain_s = time.perf_counter() - t0
    f_para = sc_after.feats(sc_after.sample_sets(single_maker(paragon_wo), sc_after.cond))
    f_comp = sc_after.feats(sc_after.sample_sets(composite_maker(shards[1:], counts[1:], "prior"), sc_after.cond))
    removed = owners.subset(idx[0])
    out = {"fid_composite_without": fid_interval(sc_after.f_ref, f_comp).as_dict(),
           "fid_paragon_retrained": fid_interval(sc_after.f_ref, f_para).as_dict(),
           "ratio": ratio_interval(sc_after.f_ref, f_comp, f_para).as_dict(),
           "paragon_retrain_seconds": round(retrain_s, 1),
           "membership_auc_removed_shard_before": membership(shards[0], removed.subset(torch.arange(min(200, len(removed)))),
                                                              sc_after.unseen.subset(torch.arange(min(200, len(sc_after.unseen)))))}
    log("forgetting:", out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200, help="paragon steps = total shard steps (equal compute)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--samples", type=int, default=400, help="images per sample set")
    ap.add_argument("--sets", type=int, default=5, help="independent sample sets per figure")
    ap.add_argument("--sampling-steps", type=int, default=50)
    ap.add_argument("--nll-steps", type=int, default=50)
    ap.add_argument("--router-steps", type=int, default=1500)
    ap.add_argument("--overfit-steps", type=int, default=1500)
    ap.add_argument("--estimators", nargs="+", default=["prior", "path"], help="add router to sample with it too")
    ap.add_argument("--no-equal-steps", action="store_true", help="skip the equal-steps-per-model regime")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = Path(args.out)
    _, labels = digits_uint8()
    own_idx, held_idx = heldout_split(labels)
    owners, held = digits_dataset(own_idx), digits_dataset(held_idx)
    # Held-out halves: the feature network's training data, and the split no generator and no scorer saw.
    a, b = stratified_halves(held.y, seed=1)
    net = train_feature_net(held.subset(a), steps=800)
    unseen = held.subset(b)
    sc = Scorer(owners, unseen, net, args.samples, args.sets, args.sampling_steps, args.nll_steps)
    results = {"settings": vars(args), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                   "torch": torch.__version__},
               "feature_net_sha256": net.sha256(), "feature_net_accuracy_on_owners":
                   float((net.predict(owners.x) == owners.y).float().mean()),
               "floor_real": sc.floor.as_dict(), "n_per_set": sc.n, "rows": [], "paragons": []}
    log("floor (real vs real):", sc.floor)
    results["controls"] = controls(args, sc, owners, unseen)
    for seed in args.seeds:
        paragon, r = fit(owners, args.steps, seed)
        para_feats = {m: sc.feats(sc.sample_sets(single_maker(paragon), lab))
                      for m, lab in (("conditional", sc.cond), ("unconditional", sc.uncond))}
        para_elbo = sc.elbo(paragon)
        p = {"seed": seed, "steps": args.steps, "train_seconds": round(r.seconds, 1), "plateau_last_quarter_drop":
             plateau(r), "nll_bpd": paired_interval(bits_per_dim(para_elbo, 64), torch.zeros(len(para_elbo))).as_dict()}
        for m in para_feats:
            p[f"fid_{m}"] = fid_interval(sc.f_ref, para_feats[m]).as_dict()
            p[f"seed_floor_{m}"] = seed_floor(para_feats[m]).as_dict()
        results["paragons"].append(p)
        log(f"paragon seed {seed}:", p)
        regimes = [("equal compute", None)]
        if seed == args.seeds[0] and not args.no_equal_steps:
            regimes.append(("equal steps", args.steps))
        for regime, per_model in regimes:
            for part, idx in partitions(owners, seed).items():
                steps = per_model or args.steps // len(idx)
                shards, counts = quality_rows(args, sc, owners, seed, part, idx, regime, steps, results, para_feats,
                                              para_elbo)
                if part == "iid" and regime == "equal compute" and seed == args.seeds[0]:
                    sc_after = Scorer(owners.subset(torch.cat(idx[1:])), unseen, net, args.samples, args.sets,
                                      args.sampling_steps, args.nll_steps)
                    results["forgetting"] = forgetting(args, sc_after, owners, seed, shards, idx, counts, args.steps)
                (out / "quality.json").write_text(json.dumps(results, indent=1))
        (out / "quality.json").write_text(json.dumps(results, indent=1))
    results["minutes"] = round((time.perf_counter() - T0) / 60, 1)
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    from bench.quality_report import write_report

    write_report(results, out / "QUALITY.md")
    log("wrote", out / "quality.json", out / "QUALITY.md")


if __name__ == "__main__":
    main()
