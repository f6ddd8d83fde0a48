"""Owner-triggered unlearning (DESIGN.md §3-§5), as resumable steps.

    plan -> go_live -> retrain -> forgetting_check -> purge -> reevaluate -> certify

Each step records its result in `.cdm/revocations/<owner_key>.json` before the next starts, so a run that
crashed anywhere is finished by running it again. The composite without the owner's shards is live after
`go_live`, before anything slow happens.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import torch

from cdm import dvc, ledger, registry
from cdm.config import Params
from cdm.workspace import Workspace, WorkspaceError, git, now

STEPS = ("plan", "go_live", "retrain", "forgetting_check", "purge", "reevaluate", "certify")
# How the flow groups the steps into Prefect tasks: taking the owner out of serving is one task, for speed.
TASKS = (("plan", "go_live"), ("retrain",), ("forgetting_check",), ("purge",), ("reevaluate",), ("certify",))


class AlreadyRevoked(WorkspaceError):
    pass


def state_path(ws: Workspace, key: str) -> Path:
    return ws.revocations_dir / f"{key}.json"


def load_state(ws: Workspace, key: str) -> dict | None:
    p = state_path(ws, key)
    return json.loads(p.read_text()) if p.exists() else None


def save_state(ws: Workspace, state: dict) -> None:
    ws.revocations_dir.mkdir(parents=True, exist_ok=True)
    p = state_path(ws, state["owner_key"])
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(p)


def begin(ws: Workspace, owner: str, reason: str | None = None, requested_by: str = "operator") -> dict:
    """Open (or resume) the revocation of `owner`. Refuses unknown and already revoked owners."""
    key = ws.owner_key(owner)
    state = load_state(ws, key)
    if state is not None and state.get("completed"):
        raise AlreadyRevoked(f"owner {owner!r} was already revoked (request {state['request_id']})")
    if state is not None:
        return state  # resume
    if owner not in ws.owners():
        raise WorkspaceError(f"unknown owner {owner!r}")
    state = {"request_id": "rev-" + uuid.uuid4().hex[:12], "owner": owner, "owner_key": key, "received": now(),
             "received_ts": time.time(), "reason": reason, "requested_by": requested_by, "steps_done": []}
    save_state(ws, state)
    return state


def done(ws: Workspace, state: dict, step: str, **results) -> dict:
    state.update(results)
    state["steps_done"].append(step)
    state[f"{step}_at"] = now()
    save_state(ws, state)
    return state


def step_plan(ws: Workspace, c, state: dict) -> dict:
    """Which shards drop (only the owner's) and which retrain (shared); the owner leaves the shard plan.
    The decision is saved before the plan changes, and the change is idempotent, so a crash here is harmless."""
    from cdm.composites import production
    from cdm.shards import load_plan, save_plan

    owner = state["owner"]
    with ws.lock():
        plan = load_plan(ws)
        if "exclusive_shards" not in state:
            prod = production(c)
            state.update(exclusive_shards=sorted(s for s, owners in plan.items() if owners == [owner]),
                         shared_shards=sorted(s for s, owners in plan.items() if owner in owners and len(owners) > 1),
                         composite_before=str(prod[0]) if prod else None,
                         estimator=prod[1]["estimator"] if prod else None)
            save_state(ws, state)
        remaining = {s: [o for o in owners if o != owner] for s, owners in plan.items()}
        save_plan(ws, {s: owners for s, owners in remaining.items() if owners})
    return done(ws, state, "plan")


def step_go_live(ws: Workspace, c, exp_id: str, params: Params, state: dict) -> dict:
    """A composite without every shard that saw the owner goes live first."""
    from cdm.composites import build_spec, register

    if state["composite_before"] is None:
        return done(ws, state, "go_live", composite_live=None, live_seconds=time.time() - state["received_ts"])
    exclude = set(state["shared_shards"])
    estimator = state["estimator"] or params.compose.estimator
    try:
        spec = build_spec(ws, c, params, estimator, exclude_shards=exclude, revocations=_revocations(c, state))
        live = register(ws, c, exp_id, params, spec, grid=False)["version"]  # the grid waits: speed first
    except WorkspaceError:  # nothing left to compose: stop serving
        mv = registry.alias_version(c, registry.COMPOSITE)
        if mv is not None:
            c.delete_registered_model_alias(registry.COMPOSITE, registry.PRODUCTION)
        live = None
    return done(ws, state, "go_live", composite_live=live, live_seconds=time.time() - state["received_ts"])


def _revocations(c, state: dict) -> list[str]:
    from cdm.composites import production

    prod = production(c)
    before = prod[1].get("revocations", []) if prod else []
    return sorted(set(before) | {state["request_id"]})


def step_retrain(ws: Workspace, c, exp_id: str, params: Params, state: dict, progress: bool = False) -> dict:
    """Shared shards are retrained without the owner's samples, from their last untouched slice checkpoint."""
    from cdm.composites import build_spec, register
    from cdm.shards import load_plan, train_and_register

    plan = load_plan(ws)
    retrained = {}
    for sid in state["shared_shards"]:
        t0 = time.time()
        info = train_and_register(ws, c, exp_id, registry.SHARD_PREFIX + sid, plan[sid], params, progress=progress)
        retrained[sid] = {**info, "wall_seconds": round(time.time() - t0, 2)}
    final = state.get("composite_live")
    if retrained and state["composite_before"] is not None:
        spec = build_spec(ws, c, params, state["estimator"] or params.compose.estimator,
                          revocations=_revocations(c, state))
        final = register(ws, c, exp_id, params, spec)["version"]
    return done(ws, state, "retrain", retrained=retrained, composite_after=final,
                router_retrained=(state["estimator"] == "router"))


def step_forgetting_check(ws: Workspace, c, params: Params, state: dict) -> dict:
    """Membership-inference AUC of the owner's samples vs held-out samples of the same labels, before and after.

    Score: the lowest denoising loss over the composite's shards (an attacker who can query every component).
    """
    from cdm.evaluate import heldout

    try:
        held = heldout(params)
    except WorkspaceError as e:
        return done(ws, state, "forgetting_check", forgetting={"skipped": str(e)})
    d = params.data
    owner_data = ws.load_owner(state["owner"], d.image_size, d.channels, d.labels)
    labels = owner_data.y.unique()
    held = held.subset(torch.isin(held.y, labels).nonzero().flatten())
    g = torch.Generator().manual_seed(0)
    n = min(len(owner_data), len(held), 300)
    members = owner_data.subset(torch.randperm(len(owner_data), generator=g)[:n])
    nonmembers = held.subset(torch.randperm(len(held), generator=g)[:n])
    versions = {tag: v for tag, v in (("before", state["composite_before"]),
                                      ("after", state.get("composite_after"))) if v is not None}
    aucs = composite_membership_auc(c, versions, members, nonmembers)
    result = {"n": n, "auc_before": aucs.get("before"), "auc_after": aucs.get("after")}
    return done(ws, state, "forgetting_check", forgetting=result)


def composite_membership_auc(c, versions: dict[str, str], members, nonmembers) -> dict[str, float]:
    """AUC per composite version; each distinct shard version is loaded and scored once."""
    import mlflow

    from cdm.metrics import denoising_loss, membership_auc
    from cdm.model import UNetDenoiser, model_config_of
    from cdm.schedulers import NoiseSchedule, train_scheduler
    from cdm.serving import UNET_ARTIFACT, load_verified_unet

    specs = {}
    for tag, version in versions.items():
        spec_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{registry.COMPOSITE}/{version}"))
        specs[tag] = json.loads((spec_dir / "artifacts" / "spec.json").read_text())
    losses: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in specs.values():
        alphas_cumprod = train_scheduler(NoiseSchedule(**spec.get("schedule", {}))).alphas_cumprod
        for shard in spec["shards"]:
            ref = (shard["model"], shard["version"])
            if ref in losses:
                continue
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{ref[0]}/{ref[1]}"))
            unet = load_verified_unet(local / "artifacts" / UNET_ARTIFACT, shard["weights_sha256"])
            null_label = model_config_of(unet).null_label
            den = UNetDenoiser(unet, null_label)
            # Unconditional losses: every shard can be scored on every sample.
            losses[ref] = tuple(denoising_loss(den, d.x, torch.full((len(d),), null_label), alphas_cumprod, repeats=2)
                                for d in (members, nonmembers))
    out = {}
    for tag, spec in specs.items():
        refs = [(s["model"], s["version"]) for s in spec["shards"]]
        out[tag] = membership_auc(torch.stack([losses[r][0] for r in refs]).min(0).values,
                                  torch.stack([losses[r][1] for r in refs]).min(0).values)
    return out


def step_purge(ws: Workspace, c, state: dict) -> dict:
    """Delete everything derived from the owner's data, then verify by listing."""
    key, owner = state["owner_key"], state["owner"]
    # 1. MLflow: every shard, paragon and composite version that saw the owner (except the live composite).
    versions, whole = [], []
    for sid in state["exclusive_shards"]:
        name = registry.SHARD_PREFIX + sid
        versions += [(name, mv.version) for mv in registry.versions(c, name)]
        whole.append(name)
    tainted_shards = set()
    for name in registry.registered_names(c, registry.SHARD_PREFIX) + [registry.PARAGON]:
        for mv in registry.versions(c, name):
            if key in json.loads(mv.tags.get("cdm.owner_keys", "[]")):
                versions.append((name, mv.version))
                tainted_shards.add((name, mv.version))
    live = {state.get("composite_after"), state.get("composite_live")} - {None}
    for mv in registry.versions(c, registry.COMPOSITE):
        comps = json.loads(mv.tags.get("cdm.components", "{}"))
        saw = any((registry.SHARD_PREFIX + s, v) in tainted_shards for s, v in comps.items())
        if (saw or key in json.loads(mv.tags.get("cdm.owner_keys", "[]"))) and mv.version not in live:
            versions.append((registry.COMPOSITE, mv.version))
    versions = sorted(set(versions))
    mlflow_result = registry.purge(c, ws.tracking_uri, versions, whole)
    # 2. Checkpoints and caches.
    removed_paths = []
    for sid in state["exclusive_shards"]:
        p = ws.checkpoints_dir / sid
        if p.exists():
            shutil.rmtree(p)
            removed_paths.append(str(p.relative_to(ws.root)))
    for sid in state["shared_shards"]:
        mv = registry.latest(c, registry.SHARD_PREFIX + sid)
        keep = set(json.loads(mv.tags["cdm.slice_keys"])) if mv else set()
        for f in (ws.checkpoints_dir / sid).glob("*.safetensors"):
            if f.stem not in keep:
                f.unlink()
                removed_paths.append(str(f.relative_to(ws.root)))
    for p in list(ws.staging_dir.glob(f"*{owner}*")) if ws.staging_dir.exists() else []:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        removed_paths.append(str(p.relative_to(ws.root)))
    # 3. Data: the owner's folder, a new DVC version, and the owner's objects in cache and remote.
    target = ws.owners_dir / owner
    with ws.lock():
        objects = owner_objects(ws, owner)
        if target.exists():
            shutil.rmtree(target)
        data_hash = dvc.add_and_push(ws.root)
        git(ws.root, "add", "data.dvc")
        git(ws.root, "commit", "-q", "-m", f"data: revoke {key}", "--allow-empty")
        keep_md5 = {dvc.md5_bytes(p.read_bytes()) for p in ws.owners_dir.rglob("*") if p.is_file()}
        to_delete = (objects - keep_md5) - {data_hash or ""}
        s3 = ws.dvc_s3_client()
        deleted = dvc.delete_objects(ws.root, to_delete, s3_client=s3)
    # 4. Verify by listing.
    listing = dvc.list_objects(ws.root, s3_client=s3)
    verification = {
        "mlflow_versions_left": [f"{n}/{v}" for n, v in versions if _version_exists(c, n, v)],
        "mlflow_tags_with_owner_key": _versions_tagged(c, key, exclude=live),
        "mlflow_db_rows_with_owner_key": _db_rows_with(ws.tracking_uri, key),
        "runs_left": [r for r in mlflow_result["runs"] if _run_exists(c, r)],
        "artifacts_left": _artifacts_left(ws, mlflow_result),
        "cache_objects_left": sorted(to_delete & listing["cache"]),
        "remote_objects_left": sorted(to_delete & listing["remote"]),
        "owner_folder_exists": target.exists(),
    }
    verification["ok"] = not any(v for v in verification.values())
    return done(ws, state, "purge", purged={**mlflow_result, "paths": removed_paths,
                                            "objects": {"cache": len(deleted["cache"]), "remote": len(deleted["remote"])},
                                            "data_hash": data_hash}, verification=verification)


def owner_objects(ws: Workspace, owner: str) -> set[str]:
    """DVC object ids of the owner's files, now and in every cached version, and the directory listings naming them."""
    prefix = f"owners/{owner}/"
    ids = set()
    folder = ws.owners_dir / owner
    if folder.exists():
        ids |= {dvc.md5_bytes(p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    for dir_id in dvc.dir_objects(ws.root, prefix=prefix):
        ids.add(dir_id)
        ids |= {e["md5"] for e in dvc.read_dir_object(ws.root, dir_id) if e.get("relpath", "").startswith(prefix)}
    return ids


def _version_exists(c, name, version) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_model_version(name, version)
        return True
    except MlflowException:
        return False


def _run_exists(c, run_id) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_run(run_id)
        return True
    except MlflowException:
        return False


def _versions_tagged(c, key: str, exclude: set) -> list[str]:
    out = []
    for m in c.search_registered_models():
        for mv in registry.versions(c, m.name):
            if key in json.loads(mv.tags.get("cdm.owner_keys", "[]")) and not (
                    m.name == registry.COMPOSITE and mv.version in exclude):
                out.append(f"{m.name}/{mv.version}")
    return out


def _db_rows_with(tracking_uri: str, key: str) -> int:
    """Registry rows (model version and registered model tags) that still mention the key, read from the SQLite
    store itself: MLflow's API hides soft-deleted versions whose rows remain."""
    if not tracking_uri.startswith("sqlite:///"):
        return 0
    import sqlite3

    with sqlite3.connect(tracking_uri.removeprefix("sqlite:///")) as db:
        return sum(db.execute(f"select count(*) from {table} where value like ?", (f"%{key}%",)).fetchone()[0]
                   for table in ("model_version_tags", "registered_model_tags"))


def _artifacts_left(ws: Workspace, mlflow_result: dict) -> list[str]:
    """Artifacts of purged logged models and runs that still exist in the artifact store (local or S3)."""
    root = ws.artifact_root.rstrip("/")
    ids = list(mlflow_result["logged_models"]) + list(mlflow_result["runs"])
    if not ids:
        return []
    if root.startswith("s3://"):
        bucket, _, prefix = root[5:].partition("/")
        pages = ws.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return sorted(k for k in keys if any(f"/{i}/" in k for i in ids))
    from urllib.parse import urlparse

    base = Path(urlparse(root).path)
    left = []
    for i in ids:
        left += [str(p) for p in base.glob(f"*/models/{i}") if any(p.rglob("*"))]
        left += [str(p) for p in base.glob(f"*/{i}") if any(p.rglob("*"))]
    return left


def step_reevaluate(ws: Workspace, c, params: Params, state: dict) -> dict:
    from cdm.evaluate import evaluate

    if state.get("composite_after") is None:
        return done(ws, state, "reevaluate", evaluation=None)
    m = evaluate(ws, c, params)
    keep = {k: m[k] for k in ("fid", "kid", "fid_ratio", "memorization", "composite_version") if k in m}
    return done(ws, state, "reevaluate", evaluation=keep)


def certificate(state: dict) -> dict:
    """The erasure certificate: what was received, what was deleted and retrained, and the verification."""
    return {
        "type": "cdm.erasure-certificate",
        "request_id": state["request_id"], "owner_key": state["owner_key"], "reason": state.get("reason"),
        "requested_by": state["requested_by"], "received": state["received"], "live": state.get("go_live_at"),
        "completed": state.get("certify_at") or now(),
        "seconds_to_live": round(state.get("live_seconds", 0.0), 3),
        "seconds_to_complete": round(time.time() - state["received_ts"], 3),
        "shards_dropped": state["exclusive_shards"], "shards_retrained": state["shared_shards"],
        "retraining": {s: {k: v for k, v in r.items() if k in ("version", "resumed_from_slice", "steps_run",
                                                                  "wall_seconds")}
                       for s, r in (state.get("retrained") or {}).items()},
        "router_retrained": state.get("router_retrained", False),
        "composite_before": state.get("composite_before"), "composite_after": state.get("composite_after"),
        "purged": state.get("purged"), "verification": state.get("verification"),
        "forgetting": state.get("forgetting"), "evaluation": state.get("evaluation"),
    }


def step_certify(ws: Workspace, c, state: dict) -> dict:
    import tempfile

    import mlflow

    cert = certificate(state)
    exp = registry.experiment_id(c, ws.artifact_root, "cdm-audit")
    with mlflow.start_run(experiment_id=exp, run_name=state["request_id"],
                          tags={"cdm.kind": "erasure-certificate", "cdm.owner_key": state["owner_key"]}) as run:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "certificate.json"
            p.write_text(json.dumps(cert, indent=2, sort_keys=True))
            mlflow.log_artifact(str(p))
    entry = ledger.append(ws.ledger_path, {"event": "revocation", "request_id": cert["request_id"],
                                           "owner_key": cert["owner_key"], "requested_by": cert["requested_by"],
                                           "received": cert["received"], "completed": cert["completed"],
                                           "shards_dropped": cert["shards_dropped"],
                                           "shards_retrained": cert["shards_retrained"],
                                           "verification_ok": bool((cert["verification"] or {}).get("ok")),
                                           "certificate_sha256": _sha(cert)})
    git(ws.root, "add", "ledger.jsonl")
    git(ws.root, "commit", "-q", "-m", f"ledger: revocation {cert['request_id']}", "--allow-empty")
    ws.update_owner_record(state["owner_key"], drop=("source", "cron", "license"), state="revoked",
                           revoked=cert["completed"], request_id=cert["request_id"])
    state.pop("owner", None)  # the raw id is not kept once the owner is gone
    state.update(completed=True, certificate=cert, ledger_seq=entry["seq"], audit_run=run.info.run_id)
    return done(ws, state, "certify")


def _sha(obj: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
