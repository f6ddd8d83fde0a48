"""cdm benchmark: quality against the paragon, speed of forgetting, cost of sampling, protection, orchestration.

Writes bench/results_v1.json and bench/RESULTS.md. Every figure is measured in this run next to its baseline.

    python bench/run.py [--total-steps 1000] [--seeds 0 1 2] [--samples 300] [--out bench]   (= make bench)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdm.compose import CompositeDenoiser, RouterConfig, ShardStack, class_priors, train_router  # noqa: E402
from cdm.data import Dataset, digits_dataset, digits_uint8, heldout_split, partition  # noqa: E402
from cdm.metrics import denoising_loss, fid_kid, membership_auc, memorization, train_feature_net  # noqa: E402
from cdm.model import ModelConfig, UNetDenoiser, build_unet  # noqa: E402
from cdm.safetensors_io import state_sha256  # noqa: E402
from cdm.pipeline import CDMPipeline  # noqa: E402
from cdm.schedulers import NoiseSchedule, sampling_scheduler, train_scheduler  # noqa: E402
from cdm.train import TrainConfig, train_shard  # noqa: E402

ESTIMATORS = ("path", "router", "prior", "average")
CFG = ModelConfig.preset("tiny")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sample(denoiser, n: int, steps: int, seed: int) -> tuple[torch.Tensor, float]:
    sched = denoiser.scheduler if isinstance(denoiser, CompositeDenoiser) else sampling_scheduler(NoiseSchedule())
    labels = torch.full((n,), CFG.null_label)
    t0 = time.perf_counter()
    x = CDMPipeline(denoiser, sched, (1, 8, 8))(labels, steps, generator=torch.Generator().manual_seed(seed))
    return x, (time.perf_counter() - t0) / n


def composite(unets, counts, estimator, seed, router=None, subset=None, threshold=0.0, evaluation="loop"):
    sched = sampling_scheduler(NoiseSchedule())
    shards = ShardStack(unets) if evaluation == "batched" else [UNetDenoiser(u, CFG.null_label) for u in unets]
    return CompositeDenoiser(shards, class_priors(counts), estimator, scheduler=sched, subset=subset,
                             threshold=threshold, evaluation=evaluation, router=router,
                             generator=torch.Generator().manual_seed(seed))


def fit(args, data: Dataset, steps: int, seed: int, init: dict | None, num_slices: int = 1, lr: float | None = None,
        **train_kw):
    """train_shard from the shared initialization `init` ({"state", "sha256"}; None: random initialization)."""
    cfg = TrainConfig(steps=steps, seed=seed, num_slices=num_slices, lr=lr or args.lr,
                      init_sha256=init["sha256"] if init else None)
    return train_shard(data, CFG, cfg, init_state=init["state"] if init else None, progress=False, **train_kw)


def build_from(state: dict) -> torch.nn.Module:
    unet = build_unet(CFG)
    unet.load_state_dict(state)
    return unet.eval()


def mean_std(values):
    values = [v for v in values if v is not None]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values), "values": values}


def quality(args, owners_ds: Dataset, net, init: dict | None, results: dict) -> dict:
    """Part 1 (and the models reused by parts 2-4)."""
    keep = {}
    rows = []
    paragons: dict[int, tuple] = {}  # per seed: the paragon sees all owners' data, whatever the partition
    for part in ("iid", "by-class"):
        for seed in args.seeds:
            if seed not in paragons:
                t0 = time.perf_counter()
                paragon = fit(args, owners_ds, args.total_steps, seed, init).unet
                paragon_train = time.perf_counter() - t0
                pfake, p_sec = sample(UNetDenoiser(paragon, CFG.null_label), args.samples, args.steps, seed)
                p_scores = fid_kid(owners_ds.x, pfake, net)
                # Reference: the paragon at the learning rate of training from scratch (its own best setting
                # here), so that a lower fine-tuning rate cannot flatter the ratio by slowing the paragon.
                ref = fit(args, owners_ds, args.total_steps, seed, init, lr=args.ref_lr).unet
                rfake, _ = sample(UNetDenoiser(ref, CFG.null_label), args.samples, args.steps, seed)
                paragons[seed] = (paragon, paragon_train, pfake, p_sec, p_scores, fid_kid(owners_ds.x, rfake, net).fid)
            paragon, paragon_train, pfake, p_sec, p_scores, ref_fid = paragons[seed]
            log(part, seed, "paragon FID", round(p_scores.fid, 2), f"(lr {args.ref_lr:g}: {ref_fid:.2f})",
                f"train {paragon_train:.0f}s")
            rows.append({"partition": part, "seed": seed, "n_shards": 1, "estimator": "paragon", "fid": p_scores.fid,
                         "kid": p_scores.kid_mean, "fid_ratio": 1.0, "fid_ratio_ref": p_scores.fid / ref_fid,
                         "paragon_ref_fid": ref_fid, "train_seconds": paragon_train,
                         "sec_per_image": p_sec, "memorization": memorization(pfake, owners_ds.x)["share"]})
            for n in args.shards:
                if n == 1:
                    continue
                idx = partition(owners_ds.y.numpy(), n, part, seed=seed)
                parts = [owners_ds.subset(torch.from_numpy(i)) for i in idx]
                t0 = time.perf_counter()
                unets = [fit(args, p, args.total_steps // n, seed, init).unet for p in parts]
                shard_train = time.perf_counter() - t0
                counts = torch.stack([p.class_counts(10) for p in parts]).float()
                shard_of = torch.cat([torch.full((len(p),), i) for i, p in enumerate(parts)])
                router, _ = train_router(Dataset.concat(parts), shard_of, n, 10,
                                         RouterConfig(steps=args.router_steps, seed=seed))
                for est in ESTIMATORS:
                    comp = composite(unets, counts, est, seed, router=router)
                    fake, sec = sample(comp, args.samples, args.steps, seed)
                    s = fid_kid(owners_ds.x, fake, net)
                    rows.append({"partition": part, "seed": seed, "n_shards": n, "estimator": est, "fid": s.fid,
                                 "kid": s.kid_mean, "fid_ratio": s.fid / p_scores.fid,
                                 "fid_ratio_ref": s.fid / ref_fid, "train_seconds": shard_train,
                                 "sec_per_image": sec, "memorization": memorization(fake, owners_ds.x)["share"]})
                    log(part, seed, n, est, "FID", round(s.fid, 2), "ratio", round(s.fid / p_scores.fid, 3))
                if part == "iid" and n == max(args.shards) and seed == args.seeds[0]:
                    keep = {"paragon": paragon, "unets": unets, "parts": parts, "counts": counts, "router": router,
                            "paragon_fid": p_scores.fid, "paragon_train": paragon_train, "shard_train": shard_train,
                            "paragon_sec": p_sec, "paragon_fake": pfake}
    results["quality_rows"] = rows
    summary = {}
    for part in ("iid", "by-class"):
        for n in args.shards:
            for est in ("paragon",) + ESTIMATORS:
                sel = [r for r in rows if r["partition"] == part and r["estimator"] == est
                       and (r["n_shards"] == n or est == "paragon")]
                if not sel or (est == "paragon" and n != 1):
                    continue
                summary[f"{part}/N={n}/{est}"] = {k: mean_std([r[k] for r in sel])
                                                  for k in ("fid", "kid", "fid_ratio", "fid_ratio_ref")}
    results["quality"] = summary
    return keep


def forgetting(args, keep: dict, owners_ds: Dataset, unseen: Dataset, net, init: dict | None, estimator: str,
               results: dict) -> None:
    """Parts 2 and 4: forgetting one of N owners (iid), FID change, membership inference, slice retraining."""
    unets, parts, counts = keep["unets"], keep["parts"], keep["counts"]
    n = len(unets)
    victim = 1
    rest = [i for i in range(n) if i != victim]
    remaining = Dataset.concat([parts[i] for i in rest])
    full = composite(unets, counts, estimator, 0, router=keep["router"])
    fake_full, _ = sample(full, args.samples, args.steps, 0)
    t0 = time.perf_counter()
    # Live: the subset composite (a router would need retraining without the owner; the other estimators do not).
    forgotten = composite(unets, counts, estimator, 0, subset=rest, router=keep["router"])
    live_seconds = time.perf_counter() - t0
    fake_after, _ = sample(forgotten, args.samples, args.steps, 0)
    fid_before = fid_kid(owners_ds.x, fake_full, net).fid
    fid_after = fid_kid(remaining.x, fake_after, net).fid
    # Membership inference: min over the composite's shards of the denoising loss.
    ac = train_scheduler(NoiseSchedule()).alphas_cumprod
    members = parts[victim]
    held = unseen.subset(torch.randperm(len(unseen), generator=torch.Generator().manual_seed(0))[:len(members)])
    members = members.subset(range(min(len(members), len(held))))

    def auc_for(idx):
        lm, ln = [], []
        for i in idx:
            d = UNetDenoiser(unets[i], CFG.null_label)
            lm.append(denoising_loss(d, members.x, torch.full((len(members),), CFG.null_label), ac))
            ln.append(denoising_loss(d, held.x, torch.full((len(held),), CFG.null_label), ac))
        return membership_auc(torch.stack(lm).min(0).values, torch.stack(ln).min(0).values)

    para = UNetDenoiser(keep["paragon"], CFG.null_label)
    lm = denoising_loss(para, members.x, torch.full((len(members),), CFG.null_label), ac)
    ln = denoising_loss(para, held.x, torch.full((len(held),), CFG.null_label), ac)
    results["forgetting"] = {
        "n_shards": n, "victim_samples": len(parts[victim]), "estimator": estimator,
        "seconds_to_live_library": live_seconds,
        "paragon_retrain_seconds_estimate": keep["paragon_train"] * len(remaining) / len(owners_ds),
        "paragon_train_seconds": keep["paragon_train"],
        "fid_before": fid_before, "fid_after": fid_after, "fid_change": fid_after / fid_before - 1,
    }
    results["protection"] = {
        "membership_auc_composite_before": auc_for(range(n)), "membership_auc_composite_after": auc_for(rest),
        "membership_auc_paragon": membership_auc(lm, ln), "members": len(members),
    }
    log("forgetting", results["forgetting"], results["protection"])
    # Slices: a shared shard of 4 owners (owner-ordered slices); revoke the last owner: resume vs scratch.
    import tempfile

    group = Dataset.concat(parts[:4])
    owner_of = torch.cat([torch.full((len(p),), i) for i, p in enumerate(parts[:4])])
    steps = args.total_steps // n * 4
    with tempfile.TemporaryDirectory() as tmp:
        fit(args, group, steps, 0, init, 4, checkpoint_dir=tmp, slice_of=owner_of)
        keep_idx = (owner_of != 3).nonzero().flatten()
        t0 = time.perf_counter()
        r = fit(args, group.subset(keep_idx), steps, 0, init, 4, checkpoint_dir=tmp, slice_of=owner_of[keep_idx])
        resume = time.perf_counter() - t0
        t0 = time.perf_counter()
        fit(args, group.subset(keep_idx), steps, 0, init, 4, slice_of=owner_of[keep_idx])
        scratch = time.perf_counter() - t0
    results["slices"] = {"owners_in_shard": 4, "resumed_from_slice": r.resumed_from_slice, "resume_seconds": resume,
                         "scratch_seconds": scratch, "speedup": scratch / resume}


def sampling_cost(args, keep: dict, owners_ds: Dataset, net, results: dict) -> None:
    """Part 3: time per image, paragon vs composite N (loop / batched / sparse), FID of sparse vs dense."""
    unets, counts = keep["unets"], keep["counts"]
    batch = args.sampling_batch
    out = {"paragon": {"sec_per_image": None}, "batch": batch}
    _, out["paragon"]["sec_per_image"] = sample(UNetDenoiser(keep["paragon"], CFG.null_label), batch, args.steps, 0)
    # The same at the FID sample count, where the fixed cost of a UNet call weighs more.
    _, para_small = sample(UNetDenoiser(keep["paragon"], CFG.null_label), args.samples, args.steps, 0)
    _, prior_small = sample(composite(unets, counts, "prior", 0), args.samples, args.steps, 0)
    out["small_batch"] = {"batch": args.samples, "paragon": para_small, "prior_loop": prior_small}
    fakes = {}
    for name, est, kw in (("dense_loop", "path", {}), ("dense_batched", "path", {"evaluation": "batched"}),
                          ("sparse_loop", "path", {"threshold": args.threshold}),
                          ("sparse_batched", "path", {"threshold": args.threshold, "evaluation": "batched"}),
                          ("prior_loop", "prior", {})):
        comp = composite(unets, counts, est, 0, **kw)
        fakes[name], sec = sample(comp, batch, args.steps, 0)
        out[name] = {"sec_per_image": sec, "ratio_to_paragon": sec / out["paragon"]["sec_per_image"],
                     "evaluations_per_image_step": comp.evaluations / batch / args.steps}
    out["fid_dense"] = fid_kid(owners_ds.x, fakes["dense_loop"], net).fid
    out["fid_sparse"] = fid_kid(owners_ds.x, fakes["sparse_loop"], net).fid
    out["fid_sparse_vs_dense"] = out["fid_sparse"] / out["fid_dense"] - 1
    out["fid_prior"] = fid_kid(owners_ds.x, fakes["prior_loop"], net).fid
    out["fid_prior_vs_dense"] = out["fid_prior"] / out["fid_dense"] - 1
    out["threshold"] = args.threshold
    results["sampling"] = out
    log("sampling", out)


def orchestration(args, results: dict) -> None:
    """Part 5 and the pipeline's forgetting times: a real workspace, flows under Prefect, one revocation."""
    import shutil
    import tempfile

    from cdm.config import Params
    from cdm.data import write_demo_owners
    from cdm.platform.context import Context
    from cdm.platform.create import init_workspace
    from flows.composition import compose
    from flows.ingestion import ingest
    from flows.training import run_training
    from flows.unlearning import unlearn_owner

    tmp = Path(tempfile.mkdtemp(prefix="cdm-bench-"))
    try:
        p = Params()
        p.train.steps, p.train.task_runner = args.pipeline_steps, "sequential"
        p.compose.num_inference_steps, p.evaluate.n_samples = args.steps, 200
        src = write_demo_owners(tmp / "src", 8, "iid")
        ws = init_workspace(tmp / "ws", params=p)
        ctx = Context.load(ws.root)
        for o in sorted(k for k in src if k != "heldout"):
            ingest(ctx, o, str(src[o]))
        t0 = time.perf_counter()
        tr = run_training(ctx)
        flow_seconds = time.perf_counter() - t0
        bare = sum(r["seconds"] for r in tr["shards"].values())
        compose(str(ws.root))
        t0 = time.perf_counter()
        cert = unlearn_owner(str(ws.root), ws.owner_key("owner-03"), reason="bench")
        revoke_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_training(ctx, paragon=True)  # the baseline: the paragon on the 7 remaining owners
        paragon_seconds = time.perf_counter() - t0
        results["orchestration"] = {
            "shards": len(tr["shards"]), "flow_seconds": flow_seconds, "bare_training_seconds": bare,
            "overhead": flow_seconds / bare - 1}
        results["pipeline_forgetting"] = {
            "seconds_to_live": cert["seconds_to_live"], "seconds_to_complete": cert["seconds_to_complete"],
            "revoke_wall_seconds": revoke_wall, "paragon_retrain_seconds": paragon_seconds,
            "live_speedup_vs_paragon_retrain": paragon_seconds / cert["seconds_to_live"],
            "complete_speedup_vs_paragon_retrain": paragon_seconds / cert["seconds_to_complete"],
            "purge_seconds": cert["purged"]["seconds"],
            "purge_speedup_vs_paragon_retrain": paragon_seconds / cert["purged"]["seconds"],
            "verification_ok": cert["verification"]["ok"]}
        log("orchestration", results["orchestration"], results["pipeline_forgetting"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def versions() -> dict:
    import importlib.metadata as md

    return {k: md.version(k) for k in ("torch", "diffusers", "accelerate", "torchmetrics", "prefect", "mlflow", "dvc")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-steps", type=int, default=1000, help="optimizer steps of the paragon = of all shards together")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--samples", type=int, default=300, help="samples per FID")
    ap.add_argument("--steps", type=int, default=50, help="DDPM sampling steps")
    ap.add_argument("--sampling-batch", type=int, default=1000, help="images per call in the sampling-cost part (3)")
    ap.add_argument("--router-steps", type=int, default=400)
    ap.add_argument("--threshold", type=float, default=1e-3, help="sparse composition threshold")
    ap.add_argument("--init", choices=["public", "none"], default="public",
                    help="shared initialization: a UNet pretrained on the public half of the held-out split")
    ap.add_argument("--lr", type=float, default=5e-4,
                    help="learning rate of every shard and of the paragon (fine-tuning from the shared init)")
    ap.add_argument("--ref-lr", type=float, default=2e-3, help="learning rate of the reference paragon")
    ap.add_argument("--pretrain-steps", type=int, default=2000, help="optimizer steps of the shared initialization")
    ap.add_argument("--pipeline-steps", type=int, default=300, help="steps per shard in the pipeline part (5)")
    ap.add_argument("--skip-pipeline", action="store_true", help="skip part 5 (Prefect/MLflow/DVC)")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    results: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                 "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
                     "versions": versions(), "args": vars(args),
                     "command": "python bench/run.py " + " ".join(sys.argv[1:]),
                     "git": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()}
    _, labels = digits_uint8()
    own, held = heldout_split(labels)
    owners_ds, heldout = digits_dataset(own), digits_dataset(held)
    # The held-out split belongs to no owner. Half of it is public pretraining data for the shared
    # initialization; the other half is never seen by any generator (the non-members of membership inference).
    pub_idx, unseen_idx = heldout_split(heldout.y.numpy(), fraction=0.5, seed=1)
    public, unseen = heldout.subset(torch.from_numpy(pub_idx)), heldout.subset(torch.from_numpy(unseen_idx))
    net = train_feature_net(heldout, steps=800)
    results["feature_net"] = {"sha256": net.sha256(),
                              "accuracy_on_owner_data": float((net.predict(owners_ds.x) == owners_ds.y).float().mean())}
    init = None
    if args.init == "public":
        t0 = time.perf_counter()
        state = train_shard(public, CFG, TrainConfig(steps=args.pretrain_steps, seed=0), progress=False).unet.state_dict()
        init = {"state": state, "sha256": state_sha256(state)}
        base_fake, _ = sample(UNetDenoiser(build_from(state), CFG.null_label), args.samples, args.steps, 0)
        results["init"] = {"kind": "public", "samples": len(public), "steps": args.pretrain_steps,
                           "seconds": time.perf_counter() - t0, "sha256": init["sha256"],
                           "fid": fid_kid(owners_ds.x, base_fake, net).fid}
        log("shared initialization", results["init"])
    keep = quality(args, owners_ds, net, init, results)
    results["default_estimator"] = choose_default(results["quality"], results["quality_rows"])
    log("default estimator", results["default_estimator"])
    forgetting(args, keep, owners_ds, unseen, net, init, results["default_estimator"]["chosen"], results)
    sampling_cost(args, keep, owners_ds, net, results)
    if not args.skip_pipeline:
        orchestration(args, results)
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    (out / "results_v1.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "RESULTS.md").write_text(render(results))
    log("done in", round(results["seconds"]), "s")


def render(r: dict) -> str:
    from bench.report import render as _render

    return _render(r)


def choose_default(q: dict, rows: list[dict]) -> dict:
    from bench.report import choose_default as _choose

    return _choose(q, rows)


if __name__ == "__main__":
    main()
