"""Serving latency of `models:/cdm-composite@production`, loaded once and asked many times, beside the paragon.

    python bench/serving_latency.py --workspace demo-workspace        # -> bench/serving_latency.json

Cold start: load the pyfunc from the registry and answer a first request of one sample (shards are fetched as
the request uses them). Warm: requests of 1, 16 and 256 samples on the loaded model, `--repeats` times each
(median and quartiles). The paragon runs the same sampler and number of steps on the same labels, in the same
process. `cdm sample --n 16` is timed as a user sees it (a new process: imports, registry, sampling).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import quartiles  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default="demo-workspace")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="1,16,256")
    ap.add_argument("--out", default=str(Path(__file__).with_name("serving_latency.json")))
    args = ap.parse_args()

    from flows.cli import env_defaults

    env_defaults()
    import mlflow
    import torch

    from cdm.platform.models.composites import production
    from cdm.platform.workspace.context import Context
    from cdm.platform.evaluation.evaluate import paragon_unet
    from cdm.model import UNetDenoiser
    from cdm.pipeline import CDMPipeline
    from cdm.schedulers import NoiseSchedule, sampling_scheduler

    ctx = Context.load(args.workspace)
    _ = ctx.client  # sets MLflow's tracking URI
    version, spec = production(ctx)
    sizes = [int(s) for s in args.sizes.split(",")]
    out: dict = {"workspace": str(ctx.ws.root), "composite_version": version, "shards": len(spec["shards"]),
                 "estimator": spec["estimator"], "steps": spec["num_inference_steps"],
                 "torch_threads": torch.get_num_threads()}

    # 1. Cold start: load from the registry + the first request.
    t0 = time.perf_counter()
    model = mlflow.pyfunc.load_model("models:/cdm-composite@production")
    loaded = time.perf_counter()
    model.predict({"n": 1, "seed": 0})
    first = time.perf_counter()
    served = model.unwrap_python_model()
    out["cold"] = {"load_s": round(loaded - t0, 3), "first_request_s": round(first - loaded, 3),
                   "shards_loaded_after_first": sum(s.loaded for s in served.shards)}

    # 2. Warm requests through the pyfunc, and the paragon on the same labels and steps.
    paragon, _ = paragon_unet(ctx, {k for s in served.spec["shards"] for k in s["owners"]})
    if paragon is None:  # trained before a revocation: its data differ, its cost does not
        from cdm.platform.models import registry

        mv = registry.latest(ctx.client, registry.PARAGON)
        paragon = mlflow.pyfunc.load_model(f"models:/{registry.PARAGON}/{mv.version}").unwrap_python_model().unet
    cfg = spec["model_config"]
    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
    null = cfg["num_classes"]
    warm, para = {}, {}
    for n in sizes:
        model.predict({"n": n, "seed": 1})  # first use of this size (allocator, shards drawn)
        times, ptimes = [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            model.predict({"n": n, "seed": 2 + r})
            times.append(time.perf_counter() - t)
            pipe = CDMPipeline(UNetDenoiser(paragon, null), sampling_scheduler(NoiseSchedule(**spec.get("schedule", {})),
                                                                               spec["sampler"]), shape)
            t = time.perf_counter()
            pipe(torch.full((n,), null), spec["num_inference_steps"], eta=spec["eta"],
                 generator=torch.Generator().manual_seed(2 + r))
            ptimes.append(time.perf_counter() - t)
        warm[str(n)], para[str(n)] = quartiles(times), quartiles(ptimes)
        ratios = [a / b for a, b in zip(times, ptimes)]  # paired by repeat (same moment, same machine load)
        warm[str(n)]["ratio_to_paragon"] = quartiles(ratios)
        print(f"n={n:4d}: composite {warm[str(n)]['median']:.3f} s, paragon {para[str(n)]['median']:.3f} s, "
              f"ratio {warm[str(n)]['ratio_to_paragon']['median']:.2f} "
              f"[{warm[str(n)]['ratio_to_paragon']['q1']:.2f}, {warm[str(n)]['ratio_to_paragon']['q3']:.2f}]",
              flush=True)
    out["warm_pyfunc"], out["paragon"] = warm, para
    out["shards_loaded_after_warm"] = sum(s.loaded for s in served.shards)

    # 3. `cdm sample` as a user runs it: a new process each time.
    cli = []
    for r in range(2):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", "sample", "--n", "16", "--seed", str(r), "--workspace",
                        str(ctx.ws.root), "--out", "/tmp/cdm-latency.png", "--json"], check=True,
                       capture_output=True)
        cli.append(time.perf_counter() - t)
    out["cdm_sample_16_s"] = [round(x, 3) for x in cli]
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("cold", "cdm_sample_16_s", "shards_loaded_after_warm")}, indent=1))


if __name__ == "__main__":
    main()
