"""cdm benchmark: quality against the paragon, speed of forgetting, cost of sampling, protection, orchestration.

Writes bench/results.json and bench/RESULTS.md. Every figure is measured in this run next to its baseline.

    python bench/run.py [--total-steps 1200] [--seeds 0 1 2] [--samples 400] [--out bench]
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
from cdm.model import ModelConfig, UNetDenoiser  # noqa: E402
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


def mean_std(values):
    values = [v for v in values if v is not None]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values), "values": values}


def quality(args, owners_ds: Dataset, net, results: dict) -> dict:
    """Part 1 (and the models reused by parts 2-4)."""
    keep = {}
    rows = []
    for part in ("iid", "by-class"):
        for seed in args.seeds:
            tcfg = TrainConfig(steps=args.total_steps, seed=seed, num_slices=1)
            t0 = time.perf_counter()
            paragon = train_shard(owners_ds, CFG, tcfg, progress=False).unet
            paragon_train = time.perf_counter() - t0
            pfake, p_sec = sample(UNetDenoiser(paragon, CFG.null_label), args.samples, args.steps, seed)
            p_scores = fid_kid(owners_ds.x, pfake, net)
            log(part, seed, "paragon FID", round(p_scores.fid, 2), f"train {paragon_train:.0f}s")
            rows.append({"partition": part, "seed": seed, "n_shards": 1, "estimator": "paragon", "fid": p_scores.fid,
                         "kid": p_scores.kid_mean, "fid_ratio": 1.0, "train_seconds": paragon_train,
                         "sec_per_image": p_sec, "memorization": memorization(pfake, owners_ds.x)["share"]})
            for n in args.shards:
                if n == 1:
                    continue
                idx = partition(owners_ds.y.numpy(), n, part, seed=seed)
                parts = [owners_ds.subset(torch.from_numpy(i)) for i in idx]
                t0 = time.perf_counter()
                unets = [train_shard(p, CFG, TrainConfig(steps=args.total_steps // n, seed=seed, num_slices=1),
                                     progress=False).unet for p in parts]
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
                                 "kid": s.kid_mean, "fid_ratio": s.fid / p_scores.fid, "train_seconds": shard_train,
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
                summary[f"{part}/N={n}/{est}"] = {k: mean_std([r[k] for r in sel]) for k in ("fid", "kid", "fid_ratio")}
    results["quality"] = summary
    return keep


def forgetting(args, keep: dict, owners_ds: Dataset, heldout: Dataset, net, results: dict) -> None:
    """Parts 2 and 4: forgetting one of N owners (iid), FID change, membership inference, slice retraining."""
    unets, parts, counts = keep["unets"], keep["parts"], keep["counts"]
    n = len(unets)
    victim = 1
    rest = [i for i in range(n) if i != victim]
    remaining = Dataset.concat([parts[i] for i in rest])
    full = composite(unets, counts, "path", 0)
    fake_full, _ = sample(full, args.samples, args.steps, 0)
    t0 = time.perf_counter()
    forgotten = composite(unets, counts, "path", 0, subset=rest)  # live: the subset composite
    live_seconds = time.perf_counter() - t0
    fake_after, _ = sample(forgotten, args.samples, args.steps, 0)
    fid_before = fid_kid(owners_ds.x, fake_full, net).fid
    fid_after = fid_kid(remaining.x, fake_after, net).fid
    # Membership inference: min over the composite's shards of the denoising loss.
    ac = train_scheduler(NoiseSchedule()).alphas_cumprod
    members = parts[victim]
    held = heldout.subset(torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[:len(members)])
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
        "n_shards": n, "victim_samples": len(parts[victim]),
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
    tcfg = TrainConfig(steps=args.total_steps // n * 4, num_slices=4, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        train_shard(group, CFG, tcfg, checkpoint_dir=tmp, progress=False, slice_of=owner_of)
        keep_idx = (owner_of != 3).nonzero().flatten()
        t0 = time.perf_counter()
        r = train_shard(group.subset(keep_idx), CFG, tcfg, checkpoint_dir=tmp, progress=False,
                        slice_of=owner_of[keep_idx])
        resume = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_shard(group.subset(keep_idx), CFG, tcfg, progress=False, slice_of=owner_of[keep_idx])
        scratch = time.perf_counter() - t0
    results["slices"] = {"owners_in_shard": 4, "resumed_from_slice": r.resumed_from_slice, "resume_seconds": resume,
                         "scratch_seconds": scratch, "speedup": scratch / resume}


def sampling_cost(args, keep: dict, owners_ds: Dataset, net, results: dict) -> None:
    """Part 3: time per image, paragon vs composite N (loop / batched / sparse), FID of sparse vs dense."""
    unets, counts = keep["unets"], keep["counts"]
    out = {"paragon": {"sec_per_image": None}}
    _, out["paragon"]["sec_per_image"] = sample(UNetDenoiser(keep["paragon"], CFG.null_label), args.samples,
                                                args.steps, 0)
    fakes = {}
    for name, kw in (("dense_loop", {}), ("dense_batched", {"evaluation": "batched"}),
                     ("sparse_loop", {"threshold": args.threshold}),
                     ("sparse_batched", {"threshold": args.threshold, "evaluation": "batched"})):
        comp = composite(unets, counts, "path", 0, **kw)
        fakes[name], sec = sample(comp, args.samples, args.steps, 0)
        out[name] = {"sec_per_image": sec, "ratio_to_paragon": sec / out["paragon"]["sec_per_image"],
                     "evaluations_per_image_step": comp.evaluations / args.samples / args.steps}
    out["fid_dense"] = fid_kid(owners_ds.x, fakes["dense_loop"], net).fid
    out["fid_sparse"] = fid_kid(owners_ds.x, fakes["sparse_loop"], net).fid
    out["fid_sparse_vs_dense"] = out["fid_sparse"] / out["fid_dense"] - 1
    out["threshold"] = args.threshold
    results["sampling"] = out
    log("sampling", out)


def orchestration(args, results: dict) -> None:
    """Part 5 and the pipeline's forgetting times: a real workspace, flows under Prefect, one revocation."""
    import shutil
    import tempfile

    from cdm.config import Params
    from cdm.data import write_demo_owners
    from cdm.workspace import init_workspace
    from flows.composition import compose
    from flows.ingestion import ingest_owner
    from flows.training import run_training
    from flows.unlearning import unlearn_owner

    tmp = Path(tempfile.mkdtemp(prefix="cdm-bench-"))
    try:
        p = Params()
        p.train.steps, p.train.task_runner = args.total_steps // 8, "sequential"
        p.compose.num_inference_steps, p.evaluate.n_samples = args.steps, 200
        src = write_demo_owners(tmp / "src", 8, "iid")
        ws = init_workspace(tmp / "ws", params=p)
        for o in sorted(k for k in src if k != "heldout"):
            ingest_owner(str(ws.root), o, str(src[o]))
        t0 = time.perf_counter()
        tr = run_training(str(ws.root))
        flow_seconds = time.perf_counter() - t0
        bare = sum(r["seconds"] for r in tr["shards"].values())
        compose(str(ws.root))
        t0 = time.perf_counter()
        cert = unlearn_owner(str(ws.root), "owner-03", "bench")
        revoke_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_training(str(ws.root), paragon=True)  # the baseline: the paragon on the 7 remaining owners
        paragon_seconds = time.perf_counter() - t0
        results["orchestration"] = {
            "shards": len(tr["shards"]), "flow_seconds": flow_seconds, "bare_training_seconds": bare,
            "overhead": flow_seconds / bare - 1}
        results["pipeline_forgetting"] = {
            "seconds_to_live": cert["seconds_to_live"], "seconds_to_complete": cert["seconds_to_complete"],
            "revoke_wall_seconds": revoke_wall, "paragon_retrain_seconds": paragon_seconds,
            "live_speedup_vs_paragon_retrain": paragon_seconds / cert["seconds_to_live"],
            "complete_speedup_vs_paragon_retrain": paragon_seconds / cert["seconds_to_complete"],
            "verification_ok": cert["verification"]["ok"]}
        log("orchestration", results["orchestration"], results["pipeline_forgetting"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def versions() -> dict:
    import importlib.metadata as md

    return {k: md.version(k) for k in ("torch", "diffusers", "accelerate", "torchmetrics", "prefect", "mlflow", "dvc")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-steps", type=int, default=1200, help="optimizer steps of the paragon = of all shards together")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--samples", type=int, default=400, help="samples per FID")
    ap.add_argument("--steps", type=int, default=50, help="DDPM sampling steps")
    ap.add_argument("--router-steps", type=int, default=400)
    ap.add_argument("--threshold", type=float, default=1e-3, help="sparse composition threshold")
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
    net = train_feature_net(heldout, steps=800)
    results["feature_net"] = {"sha256": net.sha256(),
                              "accuracy_on_owner_data": float((net.predict(owners_ds.x) == owners_ds.y).float().mean())}
    keep = quality(args, owners_ds, net, results)
    forgetting(args, keep, owners_ds, heldout, net, results)
    sampling_cost(args, keep, owners_ds, net, results)
    if not args.skip_pipeline:
        orchestration(args, results)
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "RESULTS.md").write_text(render(results))
    log("done in", round(results["seconds"]), "s")


def render(r: dict) -> str:
    from bench.report import render as _render

    return _render(r)


if __name__ == "__main__":
    main()
