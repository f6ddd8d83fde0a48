"""A short check of the GPU path: accelerate training with mixed precision, and batched composition on the GPU.

Writes a JSON report (default $OUT/gpu_check.json, else bench/gpu_check.json). Runs on CPU too (smaller).

    python bench/gpu_check.py [--steps 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def _train(preset: str, mp: str, steps: int, batch_size: int) -> tuple[dict, dict]:
    """One training configuration (in its own process): timings, losses, and the final state dict (on the CPU)."""
    from cdm.data import digits_dataset
    from cdm.model import ModelConfig
    from cdm.train import TrainConfig, train_shard

    tcfg = TrainConfig(steps=steps, batch_size=batch_size, mixed_precision=mp, lr=1e-3)
    t0 = time.perf_counter()
    r = train_shard(digits_dataset(), ModelConfig.preset(preset), tcfg, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return ({"seconds": round(time.perf_counter() - t0, 2), "steps": steps, "ms_per_step": round(1000 * r.seconds / steps, 2),
             "loss_first10": sum(r.losses[:10]) / 10, "loss_last10": sum(r.losses[-10:]) / 10, "mixed_precision": mp},
            {k: v.detach().cpu().clone() for k, v in r.unet.state_dict().items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--no-tf32", action="store_true", help="exact fp32 convolutions and matmuls on the GPU")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench"), "gpu_check.json"))
    args = ap.parse_args()

    from cdm.compose import CompositeDenoiser, ShardStack, class_priors
    from cdm.data import digits_dataset
    from cdm.model import ModelConfig, UNetDenoiser
    from cdm.pipeline import CDMPipeline
    from cdm.schedulers import NoiseSchedule, sampling_scheduler
    from cdm.train import TrainConfig, train_shard

    cuda = torch.cuda.is_available()
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if cuda else "cpu"
    report = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda}
    data = digits_dataset()
    # 1. Training through accelerate: fp32 vs bf16 mixed precision, same seed. accelerate keeps one precision per
    #    process, so each configuration trains in a process of its own (spawned).
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    for name, preset, mp in (("tiny-fp32", "tiny", "no"), ("tiny-bf16", "tiny", "bf16" if cuda else "no"),
                             ("base-bf16", "base", "bf16" if cuda else "no")):
        with spawn.Pool(1) as pool:
            report[f"train_{name}"], state = pool.apply(_train, (preset, mp, args.steps, 256 if cuda else 64))
        if name == "tiny-bf16":
            init = state
    # 1b. The shared initialization on the device: a shard started from it begins where it ended.
    from cdm.safetensors_io import state_sha256

    tcfg = TrainConfig(steps=max(30, args.steps // 5), batch_size=256 if cuda else 64, lr=1e-3,
                       mixed_precision="bf16" if cuda else "no", init_sha256=state_sha256(init), seed=1)
    r = train_shard(data, ModelConfig.preset("tiny"), tcfg, init_state=init, progress=False)
    report["train_from_shared_init"] = {"steps": tcfg.steps, "loss_first10": sum(r.losses[:10]) / 10,
                                        "loss_last10": sum(r.losses[-10:]) / 10}
    # 2. Batched composition of 8 shards on the device vs the plain loop.
    cfg = ModelConfig.preset("tiny")
    unets = []
    for i in range(8):
        torch.manual_seed(i)
        from cdm.model import build_unet

        unets.append(build_unet(cfg).eval().to(device))
    priors = class_priors(torch.rand(8, 10) + 0.1).to(device)
    sched = sampling_scheduler(NoiseSchedule(), "ddpm")
    labels = torch.full((256,), cfg.null_label, device=device)
    outs = {}
    for mode in ("single", "loop", "batched", "sparse", "prior"):
        shards = ShardStack(unets).to(device) if mode == "batched" else [UNetDenoiser(u, cfg.null_label) for u in unets]
        if mode == "single":  # one model: the paragon's cost
            comp = UNetDenoiser(unets[0], cfg.null_label)
        else:
            comp = CompositeDenoiser(shards, priors, "prior" if mode == "prior" else "path", scheduler=sched,
                                     threshold=1e-3 if mode == "sparse" else 0.0,
                                     evaluation="batched" if mode == "batched" else "loop",
                                     generator=torch.Generator().manual_seed(0)).to(device)
        pipe = CDMPipeline(comp, sched, (1, 8, 8))
        pipe(labels[:8], 5, generator=torch.Generator().manual_seed(0), device=device)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = pipe(labels, 50, generator=torch.Generator().manual_seed(0), device=device)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        outs[mode] = x.float().cpu()
        report[f"compose8_{mode}"] = {"ms_per_image": round(1000 * dt / len(labels), 3),
                                      "evaluations": getattr(comp, "evaluations", None)}
    report["tf32"] = not args.no_tf32
    report["batched_vs_loop_max_abs_diff"] = float((outs["batched"] - outs["loop"]).abs().max())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
