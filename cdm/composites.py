"""Composite versions: build the spec from the registered shards, train the router if asked, register
`cdm-composite` as a pyfunc model, move the `production` alias; load and sample the production composite.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from cdm import registry
from cdm.config import Params
from cdm.schedulers import NoiseSchedule
from cdm.shards import load_plan, load_shard_data, model_config
from cdm.workspace import Workspace, WorkspaceError


def build_spec(ws: Workspace, c, params: Params, estimator: str, exclude_shards: set[str] = frozenset(),
               revocations: list[str] | None = None) -> dict:
    """The composite's spec from the latest version of each planned shard (minus `exclude_shards`)."""
    p = params.compose
    shards = []
    for sid, owners in sorted(load_plan(ws).items()):
        if sid in exclude_shards:
            continue
        mv = registry.latest(c, registry.SHARD_PREFIX + sid)
        if mv is None:
            raise WorkspaceError(f"shard {sid} has no trained version; run `cdm train` first")
        shards.append({"id": sid, "model": mv.name, "version": mv.version,
                       "owners": json.loads(mv.tags["cdm.owner_counts"]),
                       "class_counts": json.loads(mv.tags["cdm.class_counts"]),
                       "weights_sha256": mv.tags["cdm.weights_sha256"],
                       "run_id": mv.run_id})
    if not shards:
        raise WorkspaceError("no shard to compose; ingest data and run `cdm train` first")
    return {"shards": shards, "estimator": estimator, "sampler": p.sampler,
            "num_inference_steps": p.num_inference_steps, "eta": p.eta, "threshold": p.threshold,
            "model_config": json.loads(model_config(params).to_json()), "schedule": asdict(NoiseSchedule()),
            "revocations": list(revocations or [])}


def train_spec_router(ws: Workspace, spec: dict, params: Params, path: Path, progress: bool = False) -> Path:
    """Train the router on the spec's shards' current data and save it (safetensors)."""
    from cdm.compose import RouterConfig, train_router
    from cdm.data import Dataset
    from cdm.safetensors_io import save_tree

    plan = load_plan(ws)
    parts, shard_of = [], []
    for i, shard in enumerate(spec["shards"]):
        sd = load_shard_data(ws, plan[shard["id"]], params)
        parts.append(sd.data)
        shard_of.append(torch.full((len(sd.data),), i, dtype=torch.long))
    cfg = RouterConfig(steps=params.compose.router_steps, seed=params.train.seed)
    router, _ = train_router(Dataset.concat(parts), torch.cat(shard_of), len(spec["shards"]),
                             spec["model_config"]["num_classes"], cfg, NoiseSchedule(), progress=progress)
    save_tree({"config": router.config, "weights": router.state_dict()}, path)
    return path


def register(ws: Workspace, c, exp_id: str, params: Params, spec: dict, progress: bool = False,
             set_production: bool = True, grid: bool = True) -> dict:
    """Log and register a composite version for `spec`; move `production` to it; log a sample grid (`grid`)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True))
        artifacts = {"spec": str(spec_path)}
        if spec["estimator"] == "router":
            artifacts["router"] = str(train_spec_router(ws, spec, params, Path(tmp) / "router.safetensors", progress))
        tags = {
            "cdm.components": json.dumps({s["id"]: s["version"] for s in spec["shards"]}, sort_keys=True),
            "cdm.estimator": spec["estimator"],
            "cdm.owner_keys": json.dumps(sorted({k for s in spec["shards"] for k in s["owners"]})),
            "cdm.revocations": json.dumps(spec["revocations"]),
            "cdm.router": "trained on the listed shards" if spec["estimator"] == "router" else "none",
        }
        logged = registry.log_model_run(
            c, exp_id, registry.COMPOSITE, run_name="compose", model_code="composite.py", artifacts=artifacts,
            params={"estimator": spec["estimator"], "shards": len(spec["shards"]), "sampler": spec["sampler"],
                    "num_inference_steps": spec["num_inference_steps"], "threshold": spec["threshold"]},
            metrics=None, files=[], version_tags=tags, run_tags={"cdm.kind": "composite"})
        if set_production:
            c.set_registered_model_alias(registry.COMPOSITE, registry.PRODUCTION, logged.version)
        if grid:
            # A sample grid of the new composite, logged to its run (a derived artifact: purged with it).
            from cdm.data import save_grid

            out = mlflow.pyfunc.load_model(f"models:/{registry.COMPOSITE}/{logged.version}").predict({"n": 20, "seed": 0})
            png = save_grid(torch.from_numpy(out["images"]), Path(tmp) / "samples.png", nrow=10)
            c.log_artifact(logged.run_id, str(png))
    return {"name": registry.COMPOSITE, "version": logged.version, "run_id": logged.run_id,
            "shards": [s["id"] for s in spec["shards"]], "estimator": spec["estimator"]}


def production(c) -> tuple[str, dict] | None:
    """(version, spec) of the production composite, or None."""
    import mlflow

    mv = registry.alias_version(c, registry.COMPOSITE)
    if mv is None:
        return None
    path = mlflow.artifacts.download_artifacts(f"models:/{registry.COMPOSITE}/{mv.version}")
    spec = json.loads((Path(path) / "artifacts" / "spec.json").read_text())
    return str(mv.version), spec


def load_production(c):
    import mlflow

    if registry.alias_version(c, registry.COMPOSITE) is None:
        raise WorkspaceError("no production composite; run `cdm compose` first")
    return mlflow.pyfunc.load_model(f"models:/{registry.COMPOSITE}@{registry.PRODUCTION}")
