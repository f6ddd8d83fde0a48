"""Composite versions: build the spec from registered shards, train the router if asked, register `cdm-composite`
as a pyfunc model, move the `production` alias; load the production composite.

    spec = {"shards": [{id, model, version, owners {key: n}, class_counts, weights_sha256, run_id}],
            "estimator", "sampler", "num_inference_steps", "eta", "threshold", "model_config", "schedule",
            "revocations": [request ids applied so far]}
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path

from cdm.config import model_config
from cdm.platform.models import gate, registry
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.models.shards import load_plan, load_shard_data


class NothingToCompose(WorkspaceError):
    """No shard is left to compose (every owner revoked, or nothing trained)."""


# The refusals a command meets before any flow runs (flows/commands: `compose_ready`, `evaluate_ready`) and the
# flows themselves (a deployment runs them without the CLI), worded once.
NO_SHARD = "no shard to compose; ingest data and run `cdm train` first"


def no_composite(alias: str) -> WorkspaceError:
    """The refusal of a command that needs the composite `alias` names when the registry has none."""
    hint = " --candidate" if alias != registry.PRODUCTION else ""
    return WorkspaceError(f"no {alias} composite; run `cdm compose{hint}` first")


def _shard_entry(sid: str, mv) -> dict:
    entry = {"id": sid, "model": mv.name, "version": str(mv.version),
             "owners": json.loads(mv.tags["cdm.owner_counts"]), "class_counts": json.loads(mv.tags["cdm.class_counts"]),
             "weights_sha256": mv.tags["cdm.weights_sha256"], "run_id": mv.run_id}
    if mv.tags.get("cdm.conditioning") == "text":  # a compartment of a text base: which base it adapts
        entry["base"] = {"version": mv.tags["cdm.base_version"], "sha256": mv.tags["cdm.base_sha256"]}
    return entry


def _spec(ctx: Context, shards: list[dict], estimator: str, revocations: list[str]) -> dict:
    if not shards:
        raise NothingToCompose(NO_SHARD)
    from cdm.schedulers import NoiseSchedule

    p = ctx.params.compose
    if ctx.params.data.conditioning == "text":
        return _text_spec(ctx, shards, estimator, revocations)
    return {"shards": shards, "estimator": estimator, "sampler": p.sampler,
            "num_inference_steps": p.num_inference_steps, "eta": p.eta, "threshold": p.threshold,
            "model_config": json.loads(model_config(ctx.params).to_json()), "schedule": asdict(NoiseSchedule()),
            "revocations": sorted(set(revocations))}


def _text_spec(ctx: Context, shards: list[dict], estimator: str, revocations: list[str]) -> dict:
    """A text composite's spec: its compartments all adapt one base version (named with its hash)."""
    from cdm.text.compose import TEXT_ESTIMATORS

    if estimator not in TEXT_ESTIMATORS:
        raise WorkspaceError(f"estimator {estimator!r} is for class workspaces; a text composite weighs "
                             f"compartments by {', '.join(TEXT_ESTIMATORS)}")
    bases = {(s["base"]["version"], s["base"]["sha256"]) for s in shards}
    if len(bases) != 1:
        raise WorkspaceError("the shards adapt different base versions; run `cdm train` to retrain them on the "
                             "current base")
    (version, sha), = bases
    p = ctx.params.compose
    return {"shards": shards, "estimator": estimator, "conditioning": "text",
            "base": {"model": registry.INIT, "version": version, "sha256": sha},
            "num_inference_steps": p.num_inference_steps, "guidance_scale": p.guidance_scale, "eta": p.eta,
            "revocations": sorted(set(revocations))}


def build_spec(ctx: Context, estimator: str, revocations: list[str] | None = None) -> dict:
    """The spec of the newest servable version of every planned shard (`gate.servable`: never one that saw an
    owner under revocation). Refuses when a planned shard was never trained; a shard whose every version saw a
    revoked owner (it is being retrained without them) is left out and listed under `"left_out"`."""
    shards, left_out = [], []
    for sid in sorted(load_plan(ctx.ws)):
        name = registry.SHARD_PREFIX + sid
        if registry.latest(ctx.client, name) is None:
            raise WorkspaceError(f"shard {sid} has no trained version; run `cdm train` first")
        mv = gate.servable(ctx, name)
        if mv is None:
            left_out.append(sid)
        else:
            shards.append(_shard_entry(sid, mv))
    spec = _spec(ctx, shards, estimator, revocations or [])
    return {**spec, "left_out": left_out} if left_out else spec


def spec_without(spec: dict, drop: set[str], estimator: str, revocations: list[str]) -> dict:
    """`spec` minus the shards in `drop` (a revocation going live): nothing is added or retrained."""
    shards = [s for s in spec["shards"] if s["id"] not in drop]
    if not shards:
        raise NothingToCompose("no shard is left once the revoked owner's shards are dropped")
    return {**spec, "shards": shards, "estimator": estimator,
            "revocations": sorted(set(spec.get("revocations", [])) | set(revocations))}


def spec_with_shards(ctx: Context, spec: dict, updated: list[str], estimator: str, revocations: list[str]) -> dict:
    """`spec` with the newest servable versions of the shards in `updated` (retrained after a revocation), added
    when `spec` does not hold them (going live dropped them)."""
    fresh = {sid: _shard_entry(sid, mv) for sid in updated
             if (mv := gate.servable(ctx, registry.SHARD_PREFIX + sid)) is not None}
    shards = [fresh.pop(s["id"], s) for s in spec["shards"]] + [fresh[sid] for sid in sorted(fresh)]
    return {**_spec(ctx, shards, estimator, spec.get("revocations", []) + revocations)}


def train_spec_router(ctx: Context, spec: dict, path: Path, progress: bool = False) -> Path:
    """Train the router on the spec's shards' current data (only theirs) and save it (safetensors)."""
    import torch

    from cdm.compose import RouterConfig, train_router
    from cdm.data import Dataset
    from cdm.safetensors_io import save_tree
    from cdm.schedulers import NoiseSchedule

    plan = load_plan(ctx.ws)
    parts, shard_of = [], []
    for i, shard in enumerate(spec["shards"]):
        sd = load_shard_data(ctx.ws, plan[shard["id"]], ctx.params)
        parts.append(sd.data)
        shard_of.append(torch.full((len(sd.data),), i, dtype=torch.long))
    cfg = RouterConfig(steps=ctx.params.compose.router_steps, seed=ctx.params.train.seed)
    router, _ = train_router(Dataset.concat(parts), torch.cat(shard_of), len(spec["shards"]),
                             spec["model_config"]["num_classes"], cfg, NoiseSchedule(), progress=progress)
    save_tree({"config": router.config, "weights": router.state_dict()}, path)
    return path


def version_tags(spec: dict) -> dict[str, str]:
    """A composite version's provenance tags: its components, their owners (keys), the revocations applied."""
    return {
        "cdm.components": json.dumps({s["id"]: s["version"] for s in spec["shards"]}, sort_keys=True),
        "cdm.estimator": spec["estimator"],
        "cdm.owner_keys": json.dumps(sorted({k for s in spec["shards"] for k in s["owners"]})),
        "cdm.revocations": json.dumps(spec["revocations"]),
        "cdm.router": "trained on the listed shards" if spec["estimator"] == "router" else "none",
        **({"cdm.prompt_prior": "fitted on the captions of the listed shards' owners",
            "cdm.base": f"{registry.INIT}/{spec['base']['version']}"} if spec.get("conditioning") == "text" else {}),
    }


def register(ctx: Context, spec: dict, progress: bool = False, grid: bool = True, expected: object = gate.ANY,
             previous: dict | None = None, candidate: bool = False) -> dict:
    """Log and register a composite version for `spec` and make it `production` through `gate.promote` (a
    compare-and-set against `expected`: a version, or None for "no production"; `gate.ANY` moves it from whatever
    it is); log a sample grid (`grid`). A version the gate refuses is deleted with its run before the refusal is
    raised: nothing unservable is left registered. `previous`: the spec it replaces (its description says what
    changed; default: production's). `candidate`: alias `candidate` instead of production — registered for an
    evaluation that decides (`cdm promote --candidate`), served by nothing."""
    import mlflow

    from cdm.platform.models import cleanup

    c = ctx.client
    with registry.start_run(ctx.experiment_id, "compose", {"cdm.kind": "composite"}) as run, \
            ctx.ws.tempdir() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True))
        artifacts = {"spec": str(spec_path)}
        text = spec.get("conditioning") == "text"
        if text:  # p(i | c), fitted on the captions of the composed shards' active owners
            from cdm.platform.models.text_models import PRIOR_ARTIFACT, train_spec_prior

            artifacts["prior"] = str(train_spec_prior(ctx, spec, Path(tmp) / PRIOR_ARTIFACT))
        elif spec["estimator"] == "router":
            artifacts["router"] = str(train_spec_router(ctx, spec, Path(tmp) / "router.safetensors", progress))
        tags = version_tags(spec)
        from cdm.platform.workspace.reports import composite_description

        if previous is None:
            prod = production(ctx)  # what this version changes, for the registry's description
            previous = prod[1] if prod else None
        logged = registry.log_model(
            c, run, registry.COMPOSITE, model_code="text_composite.py" if text else "composite.py",
            artifacts=artifacts, params={"estimator": spec["estimator"], "shards": len(spec["shards"]),
                                         "sampler": spec.get("sampler", "base"),
                                         "num_inference_steps": spec["num_inference_steps"],
                                         "threshold": spec.get("threshold", 0.0)},
            metrics=None, files=[], version_tags=tags, signature_kind="text" if text else "class",
            description=composite_description(spec, previous))
        try:
            if candidate:
                gate.check_servable(ctx, logged.version)
                c.set_registered_model_alias(registry.COMPOSITE, registry.CANDIDATE, logged.version)
            else:
                gate.promote(ctx, logged.version, expected)
        except (gate.Refused, gate.ProductionMoved):
            mlflow.end_run("KILLED")
            cleanup.purge(c, ctx.backend, [(registry.COMPOSITE, logged.version)], [])
            raise
        if grid:
            # A sample grid of the new composite, logged to its run (a derived artifact: purged with it).
            (Path(tmp) / "loaded").mkdir()
            model = registry.load_pyfunc(c, f"models:/{registry.COMPOSITE}/{logged.version}", Path(tmp) / "loaded")
            mlflow.log_artifact(str(sample_grid(model, Path(tmp) / "samples.png")))
    return {"name": registry.COMPOSITE, "version": logged.version, "run_id": logged.run_id,
            "shards": [s["id"] for s in spec["shards"]], "estimator": spec["estimator"],
            "left_out": spec.get("left_out", [])}


def sample_grid(model, path: Path) -> Path:
    """A PNG grid of 20 samples (seed 0, two rows) of a loaded composite: the one every composite's run logs and
    `cdm compose --out` writes."""
    import torch

    from cdm.data import save_grid

    # A text composite: the empty prompt (every compartment by its share of the captions), not an owner's caption.
    out = model.predict({"n": 20, "seed": 0, **({"prompt": ""} if _is_text(model) else {})})
    return save_grid(torch.from_numpy(out["images"]), path, nrow=10)


def _is_text(model) -> bool:
    return model.metadata.signature is not None and "prompt" in model.metadata.signature.inputs.input_names()


def spec_of(ctx: Context, version: str) -> dict:
    """The spec of a registered composite version."""
    with registry.model_files(ctx.client, registry.COMPOSITE, version, ctx.ws.tmp_dir) as files:
        return json.loads((files / "spec.json").read_text())


def production(ctx: Context, alias: str = registry.PRODUCTION) -> tuple[str, dict] | None:
    """(version, spec) of the production composite (or of the one `alias` names), or None."""
    mv = registry.alias_version(ctx.client, registry.COMPOSITE, alias)
    return None if mv is None else (str(mv.version), spec_of(ctx, str(mv.version)))


@contextlib.contextmanager
def load_production(ctx: Context, alias: str = registry.PRODUCTION):
    """The production composite (or the one `alias` names) as an MLflow pyfunc, its files in the workspace's
    temporary folder while it is in use (removed on exit); its code checked against the installed copy first."""
    if registry.alias_version(ctx.client, registry.COMPOSITE, alias) is None:
        raise no_composite(alias)
    with ctx.ws.tempdir() as tmp:
        yield registry.load_pyfunc(ctx.client, f"models:/{registry.COMPOSITE}@{alias}", tmp)
