"""Growth with the number of data owners: what each step costs at N owners, in one served process.

    python bench/owners.py --owners 8,64 [--images 30] [--steps 4]      # -> bench/owners.json

For each N, a fresh workspace (embedded stores) gets N owners of `--images` digits each, ingested one after
another by one process (imports, the Prefect API and the MLflow client paid once, as a worker or `cdm serve`
pays them), then: training (one shard per owner, `--steps` each, threads), composition (`prior`), a request of 16
samples through the production pyfunc (and how many shards it loaded), revoke-to-live (one owner out of serving:
the plan and go-live steps `cdm revoke` runs before it returns) and `cdm status`. Per-owner ingestion is reported
as median and quartiles, with the first one (cold) apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - t, 3)


def run_n(n: int, images: int, steps: int, root: Path) -> dict:
    import mlflow

    from cdm.config import Params
    from cdm.data import digits_uint8, write_class_folders
    from cdm.platform.workspace import owner_records
    from cdm.platform.forgetting import begin
    from cdm.platform.workspace.context import Context
    from cdm.platform.create import init_workspace
    from flows.commands import status
    from flows.composition import compose
    from flows.ingestion import ingest
    from flows.training import run_training
    from tasks import unlearn as steps_

    p = Params()
    p.train.steps, p.train.batch_size, p.train.num_slices = steps, 8, 1
    p.compose.num_inference_steps, p.compose.estimator = 10, "prior"
    ws = init_workspace(root / f"ws{n}", params=p)
    ctx = Context.load(ws.root)
    x, y = digits_uint8()
    owners = [f"o{i:04d}" for i in range(n)]
    for i, owner in enumerate(owners):
        idx = [(i * images + k) % len(y) for k in range(images)]
        write_class_folders(x[idx], y[idx], root / f"src{n}" / owner)
    out: dict = {"owners": n, "images_per_owner": images, "steps_per_shard": steps}

    # 1. Ingestion, owner after owner, in this process.
    per_owner, tokens = [], {}
    started = time.perf_counter()
    for owner in owners:
        result, seconds = timed(ingest, ctx, owner, str(root / f"src{n}" / owner))
        per_owner.append(seconds)
        tokens[owner] = result.get("token")
    warm = per_owner[1:] or per_owner
    q = statistics.quantiles(warm, n=4) if len(warm) > 1 else [warm[0]] * 3
    out["ingest"] = {"total_s": round(time.perf_counter() - started, 1), "first_s": per_owner[0],
                     "per_owner_median_s": round(q[1], 3), "q1": round(q[0], 3), "q3": round(q[2], 3)}
    print(f"N={n}: ingest {out['ingest']}", flush=True)
    # 2. Training: one shard per owner.
    result, seconds = timed(run_training, ctx)
    out["train"] = {"total_s": seconds, "shards": len(result["shards"]),
                    "per_shard_s": round(seconds / max(1, len(result["shards"])), 3)}
    print(f"N={n}: train {out['train']}", flush=True)
    # 3. Composition.
    _, out["compose_s"] = timed(compose, str(ws.root))
    # 4. A request of 16 samples through the production pyfunc.
    _ = ctx.client
    model, load_s = timed(mlflow.pyfunc.load_model, "models:/cdm-composite@production")
    _, first_s = timed(model.predict, {"n": 16, "seed": 0})
    _, warm_s = timed(model.predict, {"n": 16, "seed": 1})
    loaded = sum(s.loaded for s in model.unwrap_python_model().shards)
    out["sample16"] = {"load_s": load_s, "first_request_s": first_s, "warm_request_s": warm_s,
                       "shards_loaded": loaded, "shards": n}
    print(f"N={n}: sample {out['sample16']}", flush=True)
    # 5. Revoke-to-live: the first owner out of serving (what `cdm revoke` does before it returns).
    victim = owners[0]
    key = ctx.ws.owner_key(victim)
    t = time.perf_counter()
    rev = begin.begin(ctx, key, owner_records.sign_revocation(tokens[victim], key, "bench"), "bench")
    plan = steps_.plan.fn(ctx, rev.request_id)
    steps_.go_live.fn(ctx, rev.request_id, plan)
    out["revoke_to_live_s"] = round(time.perf_counter() - t, 3)
    # 6. Status.
    _, out["status_s"] = timed(status, str(ws.root))
    print(f"N={n}: revoke-to-live {out['revoke_to_live_s']} s, status {out['status_s']} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owners", default="8,64")
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).with_name("owners.json")))
    args = ap.parse_args()

    from flows.cli import env_defaults

    env_defaults()
    import os

    root = Path(tempfile.mkdtemp(prefix="cdm-owners-"))
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    rows = []
    for n in (int(v) for v in args.owners.split(",")):
        rows.append(run_n(n, args.images, args.steps, root))
        Path(args.out).write_text(json.dumps({"command": "python bench/owners.py " + " ".join(sys.argv[1:]),
                                              "rows": rows, "machine": f"{os.cpu_count()} cores"}, indent=2))
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = {k: round(b[k] / a[k], 2) for k in ("compose_s", "revoke_to_live_s", "status_s")}
        growth["ingest_per_owner"] = round(b["ingest"]["per_owner_median_s"] / a["ingest"]["per_owner_median_s"], 2)
        growth["sample16_warm"] = round(b["sample16"]["warm_request_s"] / a["sample16"]["warm_request_s"], 2)
        print(f"growth from N={a['owners']} to N={b['owners']} (x{b['owners'] / a['owners']:.0f} owners): {growth}")
        Path(args.out).write_text(json.dumps({"command": "python bench/owners.py " + " ".join(sys.argv[1:]),
                                              "rows": rows, "growth": growth,
                                              "machine": f"{os.cpu_count()} cores"}, indent=2))


if __name__ == "__main__":
    main()
