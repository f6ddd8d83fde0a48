"""Serving cost of a composite against the paragon: seconds per image and shard evaluations per image-step for each
estimator and evaluation mode, beside the FLOPs limit of the machine. Evaluation modes: `loop` (one UNet call per
shard), `batched`/`grouped` through the vmapped `ShardStack` or through `GroupedUNet` ("net": all shards as one
network with grouped layers), and `auto` as the served composite runs it (grouped network for groups of at most
`grouped_rows` rows, the loop otherwise).

Writes bench/serving_cost.json.

    python bench/serving_cost.py [--batch 1000] [--shards 8] [--steps 50] [--repeats 3] [--modes ...]

Each mode is timed --repeats times, the modes interleaved round by round; ratios to the paragon are paired by
round (median, quartiles).

The shards are 8 iid fine-tunes of one base UNet (similar models, as trained shards are), so the path estimator's
weights stay spread as they do in production rather than collapsing on random networks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdm.compose import CompositeDenoiser, ShardStack, class_priors  # noqa: E402
from cdm.grouped_unet import GroupedUNet  # noqa: E402
from cdm.data import digits_dataset  # noqa: E402
from cdm.model import ModelConfig, UNetDenoiser  # noqa: E402
from cdm.platform.serving import LazyShard, ShardSet  # noqa: E402
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


MODES = {  # name -> (estimator, threshold, evaluation, members); None: the paragon alone
    "paragon": None,
    "prior loop": ("prior", 0.0, "loop", "loop"), "prior grouped": ("prior", 0.0, "grouped", "vmap"),
    "prior grouped net": ("prior", 0.0, "grouped", "net"), "prior auto": ("prior", 0.0, "auto", "served"),
    "path sparse loop": ("path", 1e-3, "loop", "loop"), "path sparse grouped": ("path", 1e-3, "grouped", "vmap"),
    "path sparse grouped net": ("path", 1e-3, "grouped", "net"), "path sparse auto": ("path", 1e-3, "auto", "served"),
    "path dense loop": ("path", 0.0, "loop", "loop"), "path dense batched": ("path", 0.0, "batched", "vmap"),
    "path dense grouped": ("path", 0.0, "grouped", "vmap"), "path dense batched net": ("path", 0.0, "batched", "net"),
}
# The vmapped forms lost to the loop by 1.7-2.7x in every earlier run; they stay available through --modes.
DEFAULT_MODES = ("paragon,prior loop,prior grouped net,prior auto,path sparse loop,path sparse grouped net,"
                 "path dense loop,path dense batched net")


def quartiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": q[1], "q1": q[0], "q3": q[2], "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all modes, interleaved (machine load drifts)")
    ap.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from: {', '.join(MODES)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "serving_cost.json"))
    args = ap.parse_args()
    names = [m.strip() for m in args.modes.split(",")]
    if "paragon" not in names or not set(names) <= set(MODES):
        ap.error(f"--modes must include paragon and name only: {', '.join(MODES)}")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    unets = shards(args.shards, 200, 40)
    paragon = unets[0]
    priors = class_priors(torch.ones(args.shards, 10))
    labels = torch.full((args.batch,), CFG.null_label)
    members = {"loop": [UNetDenoiser(u, CFG.null_label) for u in unets], "vmap": ShardStack(unets),
               "net": GroupedUNet(unets), "served": ShardSet([LazyShard(lambda u=u: u, CFG.null_label) for u in unets])}
    flops, rate = flops_per_image_step(paragon), matmul_rate()
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()},
           "settings": vars(args), "flops_per_image_step": flops, "matmul_flops_per_second": rate, "modes": {}}

    def run(name: str, n: int, steps: int) -> tuple[float, float]:
        """One sampling of n images: seconds per image, shard evaluations per image-step."""
        sched = sampling_scheduler(NoiseSchedule())
        if MODES[name] is None:
            den = UNetDenoiser(paragon, CFG.null_label)
        else:
            est, thr, ev, kind = MODES[name]
            den = CompositeDenoiser(members[kind], priors, est, scheduler=sched, threshold=thr, evaluation=ev,
                                    generator=torch.Generator().manual_seed(0))
        pipe = CDMPipeline(den, sched, (1, 8, 8))
        t0 = time.perf_counter()
        pipe(labels[:n], steps, generator=torch.Generator().manual_seed(0))
        seconds = (time.perf_counter() - t0) / n
        return seconds, getattr(den, "evaluations", n * steps) / (n * steps)

    for name in names:  # warm-up: allocator, the grouped networks' first call
        run(name, 8, 2)
    times: dict[str, list[float]] = {n: [] for n in names}
    evals: dict[str, float] = {}
    for r in range(args.repeats):
        for name in names:
            seconds, evals[name] = run(name, args.batch, args.steps)
            times[name].append(seconds)
            print(f"round {r + 1}: {name:24s} {seconds * 1000:8.2f} ms/image  {evals[name]:5.2f} evals/image-step",
                  flush=True)
    for name in names:
        ratios = [a / b for a, b in zip(times[name], times["paragon"])]  # paired by round
        out["modes"][name] = {"ms_per_image": quartiles([1000 * s for s in times[name]]),
                              "x_paragon": quartiles(ratios), "shard_evals_per_image_step": evals[name],
                              "flops_limit_ms_per_image": 1000 * flops * evals[name] * args.steps / rate}
    Path(args.out).write_text(json.dumps(out, indent=2))
    for name, v in out["modes"].items():
        print(f"{name:24s} {v['ms_per_image']['median']:8.2f} ms/image  x{v['x_paragon']['median']:.2f} "
              f"[{v['x_paragon']['q1']:.2f}, {v['x_paragon']['q3']:.2f}]  FLOPs limit "
              f"{v['flops_limit_ms_per_image']:.2f} ms/image")


if __name__ == "__main__":
    main()
