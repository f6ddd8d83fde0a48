"""Benchmark v2: what compartmentalization costs, measured with the quality instrument (cdm/quality.py) and the
likelihood bound (cdm/likelihood.py), with positive controls before any protection figure.

Writes bench/results.json and bench/QUALITY.md (the report opens with the answer).

    python bench/quality.py [--steps 1200] [--seeds 0] [--samples 400] [--sets 6] [--target 0.03] [--out bench]

Rows: equal-size iid shards (N = 8) and by-class shards (N = 5, two digits each); class-conditional sampling with
labels in the reference's class proportions, and unconditional sampling as a second row. Two regimes: equal total
compute (paragon S steps, each shard S / N) and every model trained to the plateau of its held-out denoising loss
(`cdm.train.PlateauConfig`; the steps each took are reported). Every FID is the mean over independent sample sets
with a 95% interval; ratios are paired set by set (same seed and labels). The headline row (iid N = 8, `prior`,
class-conditional) draws paired sets until its ratio is known to +-`--target` (or `--max-sets`).
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
from cdm.quality import (features, fid_interval, paired_interval, ratio_interval, ratio_until,  # noqa: E402
                         real_floor, relative_half_width, seed_floor, stratified_halves, stratified_labels)
from cdm.schedulers import NoiseSchedule, sampling_scheduler, train_scheduler  # noqa: E402
from cdm.train import PlateauConfig, TrainConfig, train_shard  # noqa: E402

CFG = ModelConfig.preset("tiny")
NULL = CFG.null_label
SCHEDULE = NoiseSchedule()
MEMBERSHIP_T, MEMBERSHIP_DRAWS = (5, 10, 20, 40), 32  # low-t denoising loss over 32 noise draws per image
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def fit(data: Dataset, steps: int, seed: int, batch: int = 64, label_dropout: float = 0.15,
        validation: Dataset | None = None, rule: PlateauConfig | None = None):
    """Train one model: `steps` optimizer steps, or (with a rule) until its held-out loss plateaus, `steps` the cap."""
    r = train_shard(data, CFG, TrainConfig(steps=steps, seed=seed, batch_size=batch, label_dropout=label_dropout),
                    SCHEDULE, progress=False, validation=validation, plateau=rule)
    return r.unet.eval(), r


def trained_steps(r) -> int:
    """The steps behind the returned weights: the best evaluation's under a plateau rule, else all of them."""
    return r.best_step if r.best_step is not None else r.steps_run


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


def classes_of(data: Dataset, validation: Dataset) -> Dataset:
    """The held-out samples of the classes `data` holds: a model's own distribution, for its plateau rule."""
    return validation.subset(torch.isin(validation.y, data.y.unique()).nonzero().flatten())


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

    def draw(self, make, labels) -> "Sampler":
        return Sampler(self, make, labels)

    def elbo(self, unet) -> torch.Tensor:
        return elbo(UNetDenoiser(unet, NULL), self.unseen.x, self.unseen.y, SCHEDULE, self.bound)


class Sampler:
    """seed -> features of sample set `seed` of `make`; keeps the images of set 0 for the memorization check.

    Sets are drawn BLOCK at a time: block b is one sampler call on the labels repeated BLOCK times, with noise
    seeded by b, cut into BLOCK sets. Every image still has its own noise, so the sets are as independent as
    separate calls; a batch of ~1200 images costs less per image than one of 400 on a CPU. Set s of two samplers
    shares its noise (paired sets)."""

    BLOCK = 3

    def __init__(self, sc: Scorer, make, labels: torch.Tensor):
        self.sc, self.make, self.labels, self.images0, self.block = sc, make, labels, None, (-1, [])

    def __call__(self, seed: int) -> np.ndarray:
        b, k = divmod(seed, self.BLOCK)
        if self.block[0] != b:
            den, sched = self.make(b)
            x = CDMPipeline(den, sched, (1, 8, 8))(self.labels.repeat(self.BLOCK), self.sc.steps,
                                                   generator=torch.Generator().manual_seed(b))
            sets = list(x.chunk(self.BLOCK))
            if b == 0:
                self.images0 = sets[0]
            self.block = (b, [features(self.sc.net, xs) for xs in sets])
        return self.block[1][k]


class Paragon:
    """A paragon's sample sets, drawn on demand and kept: every composite row pairs its set s with the paragon's
    set s, and the headline row may need more sets than the others."""

    def __init__(self, sc: Scorer, unet, labels: torch.Tensor):
        self.one, self.sets = sc.draw(single_maker(unet), labels), []

    def __call__(self, seed: int) -> np.ndarray:
        while len(self.sets) <= seed:
            self.sets.append(self.one(len(self.sets)))
        return self.sets[seed]

    def first(self, k: int) -> list[np.ndarray]:
        return [self(s) for s in range(k)]


def composite_maker(unets, counts, estimator, router=None):
    priors = class_priors(counts)

    def make(seed):
        sched = sampling_scheduler(SCHEDULE)
        return CompositeDenoiser([UNetDenoiser(u, NULL) for u in unets], priors, estimator, scheduler=sched,
                                 router=router, generator=torch.Generator().manual_seed(seed)), sched
    return make


def single_maker(unet):
    return lambda seed: (UNetDenoiser(unet, NULL), sampling_scheduler(SCHEDULE))


def router_accuracy(router, data: Dataset, shard_of: torch.Tensor, labels: str) -> dict[int, float]:
    """The router's accuracy on noised samples (held out from its training) at several t, given the samples' own
    labels or the null label (what it sees when sampling unconditionally). Chance is 1 / N for iid shards."""
    noise = train_scheduler(SCHEDULE)
    g = torch.Generator().manual_seed(5)
    y = data.y if labels == "conditional" else torch.full_like(data.y, NULL)
    out = {}
    for t in (20, 100, 300, 600, 900):
        eps = torch.randn(data.x.shape, generator=g)
        tt = torch.full((len(data),), t)
        with torch.no_grad():
            pred = router(noise.add_noise(data.x, eps, tt), tt, y).argmax(1)
        out[t] = float((pred == shard_of).float().mean())
    return out


def train_models(args, owners: Dataset, validation: Dataset, idx: list[torch.Tensor], seed: int, regime: str,
                 rule: PlateauConfig):
    """One partition's shards under a regime: S / N steps each (equal compute) or each to its own plateau."""
    shards, results = [], []
    for i, ix in enumerate(idx):
        data = owners.subset(ix)
        if regime == "equal compute":
            unet, r = fit(data, args.steps // len(idx), seed * 100 + i)
        else:
            unet, r = fit(data, args.plateau_cap, seed * 100 + i, validation=classes_of(data, validation),
                          rule=rule)
        shards.append(unet)
        results.append(r)
    return shards, results


def quality_rows(args, sc: Scorer, owners: Dataset, validation: Dataset, seed: int, part: str,
                 idx: list[torch.Tensor], regime: str, results: dict, paragons: dict, para_elbo: torch.Tensor,
                 rule: PlateauConfig, routers: dict):
    """Train one partition's shards, then score every estimator and label mode against the paragon. `routers`
    keeps one router per (seed, partition): it sees data, not shards, so both regimes share it."""
    n = len(idx)
    t0 = time.perf_counter()
    shards, fits = train_models(args, owners, validation, idx, seed, regime, rule)
    train_s = time.perf_counter() - t0
    counts = torch.stack([owners.subset(ix).class_counts(10) for ix in idx]).float()
    shard_of = torch.cat([torch.full((len(ix),), i) for i, ix in enumerate(idx)])
    union = owners.subset(torch.cat(idx))
    if (seed, part) not in routers:
        routers[seed, part] = train_router(union, shard_of, n, 10, RouterConfig(steps=args.router_steps, seed=seed))[0]
    router = routers[seed, part]
    unseen_shard = shard_of_class(idx, owners)[sc.unseen.y] if part == "by-class" else None
    # Likelihood: shards and the mixture on the unseen split (labels: the images' own).
    shard_elbos = torch.stack([sc.elbo(u) for u in shards])
    mix = mixture_elbo(shard_elbos, class_priors(counts)[:, sc.unseen.y].double().log())
    dims = 64
    nll = {"composite_bpd": paired_interval(bits_per_dim(mix, dims), torch.zeros(len(mix))).as_dict(),
           "shards_bpd_mean": float(bits_per_dim(shard_elbos, dims).mean()),
           "gap_bpd": paired_interval(bits_per_dim(mix, dims), bits_per_dim(para_elbo, dims)).as_dict()}
    shard_mem = [shard_memorization(sc, u, owners.subset(ix)) for u, ix in zip(shards[:2], idx[:2])]
    row_base = {"seed": seed, "regime": regime, "partition": part, "N": n,
                "steps_per_shard": [trained_steps(r) for r in fits], "steps_run_per_shard": [r.steps_run for r in fits],
                "shard_sizes": [len(ix) for ix in idx], "train_seconds": round(train_s, 1),
                "plateau_last_quarter_drop": float(np.mean([plateau(r) for r in fits])), "nll": nll,
                "shard_memorization": shard_mem,
                # held-out router accuracy: by-class shards on the unseen split; iid shards are exchangeable (chance)
                "router_accuracy_vs_t": {m: router_accuracy(router, sc.unseen, unseen_shard, m)
                                         for m in ("conditional", "unconditional")} if unseen_shard is not None
                else {m: router_accuracy(router, union, shard_of, m) for m in ("conditional", "unconditional")}}
    plan = [("conditional", est) for est in args.estimators] + [("unconditional", "prior")]
    for mode, est in plan:
        make = composite_maker(shards, counts, est, router if est == "router" else None)
        t1 = time.perf_counter()
        para, draw = paragons[mode], sc.draw(make, sc.cond if mode == "conditional" else sc.uncond)
        if (part, mode, est) == ("iid", "conditional", "prior"):  # the headline row: to the stated precision
            ratio, f, _ = ratio_until(sc.f_ref, draw, para, args.target, min_sets=args.sets, max_sets=args.max_sets,
                                      step=Sampler.BLOCK)
        else:
            f = [draw(s) for s in range(args.sets)]
            ratio = ratio_interval(sc.f_ref, f, para.first(len(f)))
        fid = fid_interval(sc.f_ref, f)
        row = {**row_base, "labels": mode, "estimator": est, "sets": len(f), "fid": fid.as_dict(),
               "fid_ratio": ratio.as_dict(), "fid_ratio_half_width": relative_half_width(ratio),
               "paragon_fid": fid_interval(sc.f_ref, para.first(len(f))).as_dict(),
               "floor_real": sc.floor.as_dict(), "seed_floor": seed_floor(f).as_dict(),
               "memorization": memorization(draw.images0, owners.x)["share"],
               "sample_seconds": round(time.perf_counter() - t1, 1)}
        results["rows"].append(row)
        log(f"{regime} seed {seed} {part} N={n} {mode} {est}: FID {fid} ratio {ratio} ({len(f)} sets) NLL gap "
            f"{nll['gap_bpd']['mean']:.3f}")
    if part == "by-class":
        agree = {est: attribution_agreement(composite_maker(shards, counts, est, router if est == "router" else None),
                                            sc, idx, owners) for est in ("path", "router")}
        results.setdefault("attribution", []).append({"seed": seed, "regime": regime, **agree})
        log(f"{regime} seed {seed} attribution agreement:", agree)
    return shards, counts


def shard_memorization(sc: Scorer, unet, data: Dataset, n: int = 200) -> float:
    """Memorization share of one shard's own samples (labels in its class proportions) against its own data."""
    labels = stratified_labels(data.class_counts(10), n)
    x = CDMPipeline(UNetDenoiser(unet, NULL), sampling_scheduler(SCHEDULE), (1, 8, 8))(
        labels, sc.steps, generator=torch.Generator().manual_seed(0))
    return memorization(x, data.x)["share"]


def shard_of_class(idx, owners: Dataset) -> torch.Tensor:
    """[10] the by-class shard holding each digit."""
    out = torch.zeros(10, dtype=torch.long)
    for i, ix in enumerate(idx):
        out[owners.y[ix].unique()] = i
    return out


def attribution_agreement(make, sc: Scorer, idx, owners: Dataset) -> float:
    """Share of unconditional samples whose final-weight argmax is the shard of the digit the classifier reads."""
    comp, sched = make(0)
    x = CDMPipeline(comp, sched, (1, 8, 8))(sc.uncond[:300], sc.steps, generator=torch.Generator().manual_seed(0))
    read = sc.net.predict(x)
    return float((comp.attribution()["final"].argmax(1) == shard_of_class(idx, owners)[read]).float().mean())


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
    para = sc_after.draw(single_maker(paragon_wo), sc_after.cond)
    comp = sc_after.draw(composite_maker(shards[1:], counts[1:], "prior"), sc_after.cond)
    f_para, f_comp = [para(s) for s in range(args.sets)], [comp(s) for s in range(args.sets)]
    removed = owners.subset(idx[0])
    out = {"fid_composite_without": fid_interval(sc_after.f_ref, f_comp).as_dict(),
           "fid_paragon_retrained": fid_interval(sc_after.f_ref, f_para).as_dict(),
           "ratio": ratio_interval(sc_after.f_ref, f_comp, f_para).as_dict(),
           "floor_real": sc_after.floor.as_dict(), "paragon_retrain_seconds": round(retrain_s, 1),
           "membership_auc_removed_shard_before": membership(shards[0], removed.subset(torch.arange(min(200, len(removed)))),
                                                              sc_after.unseen.subset(torch.arange(min(200, len(sc_after.unseen)))))}
    log("forgetting:", out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200, help="paragon steps = total shard steps (equal compute)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the plateau regime: the first)")
    ap.add_argument("--samples", type=int, default=400, help="images per sample set")
    ap.add_argument("--sets", type=int, default=6, help="independent sample sets per figure")
    ap.add_argument("--target", type=float, default=0.03, help="relative half-width the headline ratio must reach")
    ap.add_argument("--max-sets", type=int, default=141, help="cap on the headline row's sample sets")
    ap.add_argument("--sampling-steps", type=int, default=50)
    ap.add_argument("--nll-steps", type=int, default=50)
    ap.add_argument("--router-steps", type=int, default=3000,
                    help="router steps (held-out accuracy at t=20 without labels: 0.94 after 1500, 0.97 after 4000)")
    ap.add_argument("--overfit-steps", type=int, default=1500)
    ap.add_argument("--plateau-cap", type=int, default=4000, help="most steps a model may take to its plateau")
    ap.add_argument("--plateau-every", type=int, default=100, help="steps between held-out loss evaluations")
    ap.add_argument("--estimators", nargs="+", default=["prior", "path"], help="add router to sample with it too")
    ap.add_argument("--regimes", nargs="+", default=["equal compute", "plateau"])
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args()
    rule, routers = PlateauConfig(every=args.plateau_every), {}
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = Path(args.out)
    _, labels = digits_uint8()
    own_idx, held_idx = heldout_split(labels)
    owners, held = digits_dataset(own_idx), digits_dataset(held_idx)
    # Held-out halves: public (the feature network's training data and the plateau rule's held-out loss), and the
    # split no generator, no stopping rule and no scorer saw (the likelihood bound, membership non-members).
    a, b = stratified_halves(held.y, seed=1)
    public, unseen = held.subset(a), held.subset(b)
    net = train_feature_net(public, steps=800)
    sc = Scorer(owners, unseen, net, args.samples, args.sets, args.sampling_steps, args.nll_steps)
    results = {"settings": vars(args), "plateau_rule": vars(rule), "machine": {
                   "platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
               "feature_net_sha256": net.sha256(), "feature_net_accuracy_on_owners":
                   float((net.predict(owners.x) == owners.y).float().mean()),
               "floor_real": sc.floor.as_dict(), "n_per_set": sc.n, "rows": [], "paragons": []}
    log("floor (real vs real):", sc.floor)
    results["controls"] = controls(args, sc, owners, unseen)

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=1))

    for seed in args.seeds:
        for regime in args.regimes if seed == args.seeds[0] else ["equal compute"]:
            if regime == "equal compute":
                paragon, r = fit(owners, args.steps, seed)
            else:
                paragon, r = fit(owners, args.plateau_cap, seed, validation=public, rule=rule)
            paragons = {m: Paragon(sc, paragon, lab) for m, lab in (("conditional", sc.cond),
                                                                    ("unconditional", sc.uncond))}
            para_elbo = sc.elbo(paragon)
            p = {"seed": seed, "regime": regime, "steps": trained_steps(r), "steps_run": r.steps_run,
                 "train_seconds": round(r.seconds, 1), "plateau_last_quarter_drop": plateau(r),
                 "heldout_losses": r.heldout_losses,
                 "nll_bpd": paired_interval(bits_per_dim(para_elbo, 64), torch.zeros(len(para_elbo))).as_dict()}
            for m, para in paragons.items():
                f = para.first(args.sets)
                p[f"fid_{m}"] = fid_interval(sc.f_ref, f).as_dict()
                p[f"seed_floor_{m}"] = seed_floor(f).as_dict()
            p["memorization"] = memorization(paragons["conditional"].one.images0, owners.x)["share"]
            results["paragons"].append(p)
            log(f"paragon {regime} seed {seed}:", {k: v for k, v in p.items() if k != "heldout_losses"})
            for part, idx in partitions(owners, seed).items():
                shards, counts = quality_rows(args, sc, owners, public, seed, part, idx, regime, results, paragons,
                                              para_elbo, rule, routers)
                if part == "iid" and regime == "equal compute" and seed == args.seeds[0]:
                    sc_after = Scorer(owners.subset(torch.cat(idx[1:])), unseen, net, args.samples, args.sets,
                                      args.sampling_steps, args.nll_steps)
                    results["forgetting"] = forgetting(args, sc_after, owners, seed, shards, idx, counts, args.steps)
                save()
    results["minutes"] = round((time.perf_counter() - T0) / 60, 1)
    save()
    from bench.quality_report import write_report

    write_report(results, out / "QUALITY.md")
    log("wrote", out / "results.json", out / "QUALITY.md")


if __name__ == "__main__":
    main()
