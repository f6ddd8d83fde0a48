"""Step `purge`: everything derived from the owner's data is deleted, as an intent recorded first lists it.

    intent (recorded) -> MLflow runs, logged models, versions, whole models -> checkpoints, reports, slices
    -> under the lock: the owner's folder, a new DVC version, their objects in remote and cache, DVC's site cache
    -> Prefect's log lines that name them

Each part is idempotent and the intent is kept, so a rerun after a crash anywhere inside deletes at least what the
first run set out to, even once the tags and files the intent was derived from are gone.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from cdm.platform.data import dvc
from cdm.platform.forgetting.needles import owner_objects
from cdm.platform.forgetting.record import (Live, Plan, Purged, PurgeIntent, Retrained, Revocation, fault_point, needles_path,
                                           recorded, save)
from cdm.platform.models import cleanup, registry
from cdm.platform.workspace import owner_records
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.gitrepo import commit
from cdm.platform.workspace.paths import Workspace


def purge_intent(ctx: Context, rev: Revocation, plan: Plan, live: Live, retrained: Retrained) -> PurgeIntent:
    """Everything the purge will delete, from the registry, the needles taken at `begin` and the data as it is now,
    unioned with an intent recorded by an earlier, interrupted run."""
    from cdm.platform.models.shards import load_plan

    c, key, ws = ctx.client, rev.owner_key, ctx.ws
    keep = {(registry.COMPOSITE, v) for v in (live.composite_live, retrained.composite_after) if v}
    every = registry.all_versions(c)
    saw = {(mv.name, str(mv.version)) for mv in every if mv.name != registry.COMPOSITE and
           (mv.tags.get(registry.REVOKED) == rev.request_id or key in json.loads(mv.tags.get("cdm.owner_keys", "[]")))}
    saw |= {(registry.SHARD_PREFIX + sid, str(mv.version)) for sid in plan.exclusive_shards
            for mv in registry.versions(c, registry.SHARD_PREFIX + sid)}
    for mv in every:
        if mv.name == registry.COMPOSITE:
            components = {(registry.SHARD_PREFIX + s, str(v))
                          for s, v in json.loads(mv.tags.get("cdm.components", "{}")).items()}
            if (mv.tags.get(registry.REVOKED) == rev.request_id or components & saw
                    or key in json.loads(mv.tags.get("cdm.owner_keys", "[]"))):
                saw.add((mv.name, str(mv.version)))
    versions = saw - keep
    whole = [registry.SHARD_PREFIX + sid for sid in plan.exclusive_shards if sid not in load_plan(ws)]
    runs = sorted(r.info.run_id for r in registry.runs_of_owner(c, key))
    paths = [str((ws.checkpoints_dir / sid).relative_to(ws.root)) for sid in plan.exclusive_shards]
    paths.append(str((ws.latents_dir / key).relative_to(ws.root)))  # a text owner's cached VAE latents
    # The DVC pipeline's files derived from the owner's shards: their loss curves, and the last sample grid.
    paths += [f"pipeline/train_loss/{sid}.csv" for sid in plan.exclusive_shards] + ["pipeline/samples.png"]
    paths += [str(p.relative_to(ws.root)) for p in ws.reports_dir.glob(f"ingest-{key}-*")] \
        if ws.reports_dir.exists() else []
    if rev.purge_intent is not None:  # an interrupted run's intent: whatever it named is deleted too
        old = rev.purge_intent
        versions |= {tuple(v) for v in old.versions} - keep
        whole = sorted(set(whole) | set(old.registered_models))
        paths = sorted(set(paths) | set(old.paths))
        runs = sorted(set(runs) | set(old.runs))
    return PurgeIntent(versions=sorted(versions), registered_models=sorted(whole), paths=sorted(paths), runs=runs)


def purge(ctx: Context, rev: Revocation, intent: PurgeIntent, plan: Plan, prefect_db: Path | None = None) -> Purged:
    """Delete everything derived from the owner's data, as the recorded `intent` lists it (each part idempotent,
    so a rerun after a crash anywhere inside finishes it). `prefect_db`: the SQLite file of the Prefect API in use,
    whose log lines naming the owner go too."""
    from cdm.platform.models import gate
    from cdm.platform.models.shards import prune_checkpoints

    t0 = time.time()
    ws, c, key = ctx.ws, ctx.client, rev.owner_key
    owner = owner_records.record(ws, key).owner
    # 1. MLflow: runs and logged models garbage-collected, then the versions (tags first) and whole models.
    mlflow_result = cleanup.purge(c, ctx.backend, [tuple(v) for v in intent.versions], intent.registered_models,
                                  intent.runs)
    fault_point("purge:after-mlflow")
    # 2. Checkpoints, validation reports and evaluation outputs that name the owner's key; the slices of shared
    #    shards that the servable version does not use (those after the owner's data entered).
    removed = []
    for rel in intent.paths:
        removed += _remove(ws, ws.root / rel)
    for sid in plan.shared_shards:
        mv = gate.servable(ctx, registry.SHARD_PREFIX + sid)
        removed += prune_checkpoints(ctx, sid, [mv] if mv else [])
    # 3. Data, under the lock: an interrupted ingestion is undone first (so no staging copy of anyone's data is
    #    left half-committed), then the owner's folder, a new DVC version, the owner's objects in the remote then
    #    the cache (content another remaining owner holds stays), DVC's site cache (its index names their files).
    from cdm.platform.data.ingest import recover_interrupted

    with ws.lock():
        recover_interrupted(ctx)
        objects = set(json.loads(needles_path(ws, rev.request_id).read_text())["dvc_objects"])
        objects |= owner_objects(ws, owner)
        removed += [p.replace(f"owners/{owner}", f"owners/<{key}>") for p in _remove(ws, ws.owners_dir / owner)]
        data_hash = dvc.add_and_push(ws.root, retry_delays=ctx.params.data.push_retry_delays)
        commit(ws.root, f"data: revoke {key}", "data.dvc")
        fault_point("purge:after-commit")
        held = {dvc.md5_bytes(p.read_bytes()) for p in ws.owners_dir.rglob("*") if p.is_file()}
        deleted = dvc.delete_objects(ws.root, (objects - held) - {data_hash or ""},
                                     s3_client=ctx.dvc_s3())
        removed += _remove(ws, dvc.site_cache_dir(ws.root))
    removed += _remove_stale_tmp(ws)
    # 4. Prefect's log lines that name the owner (its run logs are redacted at the source; this catches the rest).
    others = tuple(r.owner for k, r in owner_records.records(ws).items() if k != key)
    from cdm.platform.forgetting.stores import purge_prefect_logs

    logs = purge_prefect_logs(prefect_db, owner, key, others) if prefect_db is not None else 0
    return Purged(**mlflow_result, paths=removed, objects={k: len(v) for k, v in deleted.items()},
                  data_hash=data_hash, seconds=round(time.time() - t0, 2), prefect_logs=logs)


def run(ctx: Context, rev: Revocation, plan: Plan, live: Live, retrained: Retrained,
        prefect_db: Path | None = None) -> Purged:
    """The intent is recorded (`purge_intent`) before anything is deleted; then the purge, recorded."""
    def intent_then_purge() -> Purged:
        rev.purge_intent = purge_intent(ctx, rev, plan, live, retrained)
        save(ctx.ws, rev)
        fault_point("purge:after-intent")
        return purge(ctx, rev, rev.purge_intent, plan, prefect_db)

    return recorded(ctx.ws, rev, "purge", intent_then_purge)


def _remove_stale_tmp(ws: Workspace) -> list[str]:
    """Temporary folders of processes that died before removing them (`Workspace.tempdir` names them by pid)."""
    removed = []
    for d in ws.tmp_dir.iterdir() if ws.tmp_dir.exists() else []:
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and not cleanup.process_alive(int(pid)):
            removed += _remove(ws, d)
    return removed


def _remove(ws: Workspace, path: Path) -> list[str]:
    if not path.exists():
        return []
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return [str(path.relative_to(ws.root))]
