"""Core timings: a training step of each preset at batch 64, and sampling time per image for 1, 4 and 8 shards,
plain loop vs batched (vmap) evaluation. Writes bench/core.json.

    python bench/core.py [--batch 64] [--images 64] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdm.compose import CompositeDenoiser, ShardStack, class_priors  # noqa: E402
from cdm.data import digits_dataset  # noqa: E402
from cdm.model import ModelConfig, UNetDenoiser, build_unet  # noqa: E402
from cdm.pipeline import CDMPipeline  # noqa: E402
from cdm.schedulers import NoiseSchedule, sampling_scheduler  # noqa: E402
from cdm.train import TrainConfig, train_shard  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "core.json"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = {"threads": torch.get_num_threads(), "batch": args.batch}
    data = digits_dataset()
    for preset in ("tiny", "small"):
        cfg = ModelConfig.preset(preset)
        train_shard(data, cfg, TrainConfig(steps=5, batch_size=args.batch), progress=False)  # warm-up
        r = train_shard(data, cfg, TrainConfig(steps=40, batch_size=args.batch), progress=False)
        out[f"train_step_seconds_{preset}"] = r.seconds / 40
        out[f"parameters_{preset}"] = sum(p.numel() for p in r.unet.parameters())
    cfg = ModelConfig.preset("tiny")
    sched = sampling_scheduler(NoiseSchedule())
    labels = torch.full((args.images,), cfg.null_label)
    for n in (1, 4, 8):
        unets = []
        for i in range(n):
            torch.manual_seed(i)
            unets.append(build_unet(cfg).eval())
        priors = class_priors(torch.ones(n, 10))
        for mode in ("loop", "batched"):
            shards = ShardStack(unets) if mode == "batched" else [UNetDenoiser(u, cfg.null_label) for u in unets]
            comp = CompositeDenoiser(shards, priors, "path", scheduler=sched, evaluation=mode)
            pipe = CDMPipeline(comp, sched, (1, 8, 8))
            pipe(labels[:4], 2, generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            pipe(labels, args.steps, generator=torch.Generator().manual_seed(0))
            out[f"sample_seconds_per_image_{n}_shards_{mode}"] = (time.perf_counter() - t0) / args.images
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
