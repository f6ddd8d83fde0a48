"""Serving cost of a composite against the paragon: seconds per image and shard evaluations per image-step for each
estimator and evaluation mode (loop, batched, grouped), beside the FLOPs limit of the machine.

Writes bench/serving_cost.json.

    python bench/serving_cost.py [--batch 1000] [--shards 8] [--steps 50]

The shards are 8 iid fine-tunes of one base UNet (similar models, as trained shards are), so the path estimator's
weights stay spread as they do in production rather than collapsing on random networks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdm.compose import CompositeDenoiser, ShardStack, class_priors  # noqa: E402
from cdm.data import digits_dataset  # noqa: E402
from cdm.model import ModelConfig, UNetDenoiser  # noqa: E402
from cdm.pipeline import CDMPipeline  # noqa: E402
from cdm.safetensors_io import state_sha256  # noqa: E402
from cdm.schedulers import NoiseSchedule, sampling_scheduler  # noqa: E402
from cdm.train import TrainConfig, train_shard  # noqa: E402

CFG = ModelConfig.preset("tiny")


def flops_per_image_step(unet) -> int:
    """FLOPs of one UNet call on one 8x8 image (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, y = torch.zeros(16, 1, 8, 8), torch.zeros(16, dtype=torch.long), torch.zeros(16, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, class_labels=y)
    return counter.get_total_flops() // 16


def matmul_rate(size: int = 1024, reps: int = 20) -> float:
    """Measured float32 matmul rate of this machine, FLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.perf_counter() - t0)


def shards(n: int, base_steps: int, steps: int) -> list:
    data = digits_dataset()
    base = train_shard(data, CFG, TrainConfig(steps=base_steps, seed=0), progress=False).unet
    init = {k: v.clone() for k, v in base.state_dict().items()}
    sha = state_sha256(init)
    parts = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).chunk(n)
    return [train_shard(data.subset(p), CFG, TrainConfig(steps=steps, seed=i, init_sha256=sha), init_state=init,
                        progress=False).unet.eval() for i, p in enumerate(parts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--out", default=str(Path(__file__).parent / "serving_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    unets = shards(args.shards, 200, 40)
    paragon = unets[0]
    priors = class_priors(torch.ones(args.shards, 10))
    labels = torch.full((args.batch,), CFG.null_label)
    stack = ShardStack(unets)
    flops, rate = flops_per_image_step(paragon), matmul_rate()
    modes = {"paragon": None,
             "prior loop": ("prior", 0.0, "loop"), "prior grouped": ("prior", 0.0, "grouped"),
             "path sparse loop": ("path", 1e-3, "loop"), "path sparse grouped": ("path", 1e-3, "grouped"),
             "path dense loop": ("path", 0.0, "loop"), "path dense batched": ("path", 0.0, "batched"),
             "path dense grouped": ("path", 0.0, "grouped")}
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()},
           "settings": vars(args), "flops_per_image_step": flops, "matmul_flops_per_second": rate, "modes": {}}
    for name, mode in modes.items():
        sched = sampling_scheduler(NoiseSchedule())
        if mode is None:
            den = UNetDenoiser(paragon, CFG.null_label)
        else:
            est, thr, ev = mode
            members = stack if ev != "loop" else [UNetDenoiser(u, CFG.null_label) for u in unets]
            den = CompositeDenoiser(members, priors, est, scheduler=sched, threshold=thr, evaluation=ev,
                                    generator=torch.Generator().manual_seed(0))
        pipe = CDMPipeline(den, sched, (1, 8, 8))
        pipe(labels[:8], 2, generator=torch.Generator().manual_seed(1))  # warm-up
        t0 = time.perf_counter()
        pipe(labels, args.steps, generator=torch.Generator().manual_seed(0))
        seconds = (time.perf_counter() - t0) / args.batch
        evals = getattr(den, "evaluations", args.batch * args.steps) / (args.batch * args.steps)
        out["modes"][name] = {"seconds_per_image": seconds, "shard_evals_per_image_step": evals,
                              "flops_limit_seconds_per_image": flops * evals * args.steps / rate}
        print(f"{name:22s} {seconds * 1000:8.2f} ms/image  {evals:5.2f} evals/image-step", flush=True)
    base = out["modes"]["paragon"]["seconds_per_image"]
    for v in out["modes"].values():
        v["x_paragon"] = v["seconds_per_image"] / base
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
