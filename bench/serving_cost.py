"""Serving cost of a composite against the paragon: seconds per image and shard evaluations per image-step for each
estimator and evaluation mode, beside the FLOPs limit of the machine. Evaluation modes: `loop` (one UNet call per
shard), `batched`/`grouped` through the vmapped `ShardStack` or through `GroupedUNet` ("net": all shards as one
network with grouped layers), and `auto` as the served composite runs it (grouped network for groups of at most
`grouped_rows` rows, the loop otherwise).

Writes bench/serving_cost.json.

    python bench/serving_cost.py [--batch 1000] [--shards 8] [--steps 50] [--repeats 3] [--modes ...]

Each mode is timed --repeats times, the modes interleaved round by round; ratios to the paragon are paired by
round (median, quartiles).

The shards are 8 fine-tunes of one base UNet (similar models, as trained shards are, so the path estimator's weights
behave as in production rather than collapsing on random networks), on an iid split of the digits by default, or
by class (`--partition by-class`), where the shards differ and the path posterior concentrates.
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

from bench import quartiles  # noqa: E402
from cdm.compose import CompositeDenoiser, ShardStack, class_priors  # noqa: E402
from cdm.grouped_unet import GroupedUNet  # noqa: E402
from cdm.data import digits_dataset  # noqa: E402
from cdm.model import ModelConfig, UNetDenoiser  # noqa: E402
from cdm.platform.models.serving import LazyShard, ShardSet  # noqa: E402
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


def shards(n: int, base_steps: int, steps: int, partition: str = "iid") -> tuple[list, torch.Tensor]:
    """n fine-tunes of one base UNet on a partition of the digits: `iid` (random, similar shards: the path
    weights stay spread) or `by-class` (digit c to shard c mod n: distinct shards, the weights concentrate).
    -> (UNets, class counts [n, 10])."""
    data = digits_dataset()
    base = train_shard(data, CFG, TrainConfig(steps=base_steps, seed=0), progress=False).unet
    init = {k: v.clone() for k, v in base.state_dict().items()}
    sha = state_sha256(init)
    if partition == "iid":
        parts = list(torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).chunk(n))
    elif partition == "by-class":
        parts = [torch.nonzero(data.y % n == i).flatten() for i in range(n)]
    else:
        raise ValueError(f"unknown partition {partition!r}")
    counts = torch.stack([torch.bincount(data.y[p], minlength=10) for p in parts]).float()
    unets = [train_shard(data.subset(p), CFG, TrainConfig(steps=steps, seed=i, init_sha256=sha), init_state=init,
                         progress=False).unet.eval() for i, p in enumerate(parts)]
    return unets, counts


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


def members_of(unets: list, device: str = "cpu") -> dict:
    """The shards in each form a mode evaluates them through."""
    unets = [u.to(device) for u in unets]
    return {"loop": [UNetDenoiser(u, CFG.null_label) for u in unets], "vmap": ShardStack(unets).to(device),
            "net": GroupedUNet(unets).to(device),
            "served": ShardSet([LazyShard(lambda u=u: u, CFG.null_label) for u in unets])}


def sample_seconds(name: str, members: dict, paragon, priors: torch.Tensor, labels: torch.Tensor, steps: int,
                   device: str = "cpu", autocast: torch.dtype | None = None) -> tuple[float, float, torch.Tensor]:
    """One sampling of the labels in mode `name`: (seconds per image, shard evaluations per image-step, images)."""
    sched = sampling_scheduler(NoiseSchedule())
    if MODES[name] is None:
        den = paragon
    else:
        est, thr, ev, kind = MODES[name]
        den = CompositeDenoiser(members[kind], priors, est, scheduler=sched, threshold=thr, evaluation=ev,
                                generator=torch.Generator().manual_seed(0)).to(device)
    pipe = CDMPipeline(den, sched, (1, 8, 8))
    cuda = device.startswith("cuda")
    with torch.autocast(device.split(":")[0], dtype=autocast, enabled=autocast is not None):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = pipe(labels, steps, generator=torch.Generator().manual_seed(0), device=device)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / len(labels)
    return seconds, getattr(den, "evaluations", len(labels) * steps) / (len(labels) * steps), x.float().cpu()


def time_modes(names: list[str], members: dict, paragon, priors: torch.Tensor, labels: torch.Tensor, steps: int,
               repeats: int, device: str = "cpu", autocast: torch.dtype | None = None, log=print) -> dict:
    """Each mode timed `repeats` times, the modes interleaved round by round (machine load drifts); ratios to the
    paragon paired by round. -> {name: {ms_per_image, x_paragon, shard_evals_per_image_step}}."""
    for name in names:  # warm-up: allocator, kernels, the grouped networks' first call
        sample_seconds(name, members, paragon, priors, labels[:8], 2, device, autocast)
    times: dict[str, list[float]] = {n: [] for n in names}
    evals: dict[str, float] = {}
    for r in range(repeats):
        for name in names:
            seconds, evals[name], _ = sample_seconds(name, members, paragon, priors, labels, steps, device, autocast)
            times[name].append(seconds)
            log(f"round {r + 1}: {name:24s} {seconds * 1000:8.3f} ms/image  {evals[name]:5.2f} evals/image-step")
    return {name: {"ms_per_image": quartiles([1000 * s for s in times[name]]),
                   "x_paragon": quartiles([a / b for a, b in zip(times[name], times["paragon"])]),
                   "shard_evals_per_image_step": evals[name]} for name in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="sampling steps")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all modes, interleaved (machine load drifts)")
    ap.add_argument("--partition", choices=("iid", "by-class"), default="iid",
                    help="how the digits are split among the shards (by-class: sparse path evaluation can pay off)")
    ap.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from: {', '.join(MODES)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "serving_cost.json"))
    args = ap.parse_args()
    names = [m.strip() for m in args.modes.split(",")]
    if "paragon" not in names or not set(names) <= set(MODES):
        ap.error(f"--modes must include paragon and name only: {', '.join(MODES)}")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    unets, counts = shards(args.shards, 200, 40, args.partition)
    priors = class_priors(counts)
    labels = torch.full((args.batch,), CFG.null_label)
    flops, rate = flops_per_image_step(unets[0]), matmul_rate()
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()},
           "settings": vars(args), "flops_per_image_step": flops, "matmul_flops_per_second": rate,
           "modes": time_modes(names, members_of(unets), UNetDenoiser(unets[0], CFG.null_label), priors, labels,
                               args.steps, args.repeats, log=lambda line: print(line, flush=True))}
    for v in out["modes"].values():
        v["flops_limit_ms_per_image"] = 1000 * flops * v["shard_evals_per_image_step"] * args.steps / rate
    Path(args.out).write_text(json.dumps(out, indent=2))
    for name, v in out["modes"].items():
        print(f"{name:24s} {v['ms_per_image']['median']:8.2f} ms/image  x{v['x_paragon']['median']:.2f} "
              f"[{v['x_paragon']['q1']:.2f}, {v['x_paragon']['q3']:.2f}]  FLOPs limit "
              f"{v['flops_limit_ms_per_image']:.2f} ms/image")


if __name__ == "__main__":
    main()
