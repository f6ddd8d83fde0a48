"""Owner-triggered unlearning as a typed state machine (docs/design.md §5).

    begin -> plan -> go_live -> retrain -> forgetting_check -> purge -> verify -> reevaluate -> certify

`Revocation` is the crash-safe record (`.cdm/revocations/<request_id>.json`): each step's typed output is stored
before the next step starts, so a run that died anywhere is finished by running it again, and `cdm status` reads
progress from it. Each step is a function `(ctx, revocation, inputs...) -> output`; `tasks/unlearn.py` runs each
as one Prefect task. The owner's raw id is read from the owner record when a step needs it, never stored here.

Needles for the final scan (the token's public key, the owner's sample hashes and files, DVC object ids) are taken
at `begin`, while the data still exists, into `<request_id>.needles.json` beside the record (0600): a run resumed
after the purge searches for the same; `complete` deletes that file. The verification
step lives in `cdm.platform.forgetting.verification`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

from cdm.platform.models import cleanup, registry
from cdm.platform.data import dvc
from cdm.platform.workspace import ledger, owner_records
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import CommandFailed, WorkspaceError
from cdm.platform.workspace.gitrepo import commit
from cdm.platform.workspace.revocations import (Forgetting, Live, Plan, Purged, PurgeIntent, Retrained, Revocation, load,
                                                needles_path, record_path, runner_lock, save, sweep_needles)
from cdm.platform.forgetting.verification import owner_objects, write_needles
from cdm.platform.workspace.paths import Workspace, now

class AlreadyRevoked(WorkspaceError):
    pass


class RevocationRunning(WorkspaceError):
    """Another process is working on this request (one runner per request)."""


class VerificationFailed(CommandFailed):
    """The scan found traces: the request stays open, its purge is redone by the next run (exit 1)."""


# Fault-injection points a test arms with CDM_FAULT=<point> (the process kills itself there with SIGKILL, as a
# crash would): one inside every step that writes, between its writes (tests/flows/test_faults.py).
def fault_point(name: str) -> None:
    if os.environ.get("CDM_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def begin(ctx: Context, owner_key: str, proof: dict | None = None, reason: str | None = None,
          via: str = "command", create: bool = True) -> Revocation:
    """Accept (or resume) the revocation of the owner `owner_key`.

    Under the workspace lock, in this order: the request record and the needles (what the scan will look for),
    the owner record `revoked` (source, schedule, license and token hash dropped: any ingestion of them is refused
    from here on), then every registered version that saw them marked unservable and the registry's revocation
    epoch moved (`gate.mark_revoked`: serving processes drop them at their next request). A request resumed after
    a crash marks again. `proof` (`owner_records.sign_revocation`: the request signed with the owner's token, over
    the owner key, `reason` and its time) makes it the owner's own request; without it the request is the
    operator's.
    Refuses unknown and already revoked owners, and any request while a store this workspace used is unreachable.
    """
    from cdm.platform.models import gate
    from cdm.platform.forgetting.stores import require_reachable

    ws = ctx.ws
    require_reachable(ctx)
    sweep_needles(ws)
    with ws.lock():
        rec = owner_records.record(ws, owner_key)
        if rec is None or (rec.state != "revoked" and rec.owner not in ws.owners()):
            raise WorkspaceError(f"unknown owner {owner_key}")
        if rec.state == "revoked" and rec.revocation:
            existing = load(ws, rec.revocation)
            if existing.completed:
                raise AlreadyRevoked(f"owner {owner_key} was already revoked (request {existing.request_id})")
            gate.mark_revoked(ctx, owner_key, existing.request_id)
            return existing  # resume
        if not create:
            raise PermissionError(f"no revocation of {owner_key} is in progress; an owner's request is signed with "
                                  "their token, an operator's is made with `cdm revoke` on the workspace")
        requested_by = "operator"
        if proof is not None:
            received = proof.get("received")  # an event's receipt time, never later than now
            owner_records.check_revocation(rec, owner_key, reason, proof.get("issued_at"), proof.get("signature"),
                                           now=min(received, time.time()) if received is not None else None)
            requested_by = "owner"
        _drop_unaccepted(ws, owner_key)
        from cdm.platform.models.shards import load_plan

        shards = {s: [ws.owner_key(o) for o in owners] for s, owners in load_plan(ws).items() if rec.owner in owners}
        rev = Revocation(request_id="rev-" + uuid.uuid4().hex[:12], owner_key=owner_key, received=now(),
                         received_ts=time.time(), reason=reason, requested_by=requested_by, requested_via=via,
                         shards=shards)
        write_needles(ctx, rec, needles_path(ws, rev.request_id))
        fault_point("begin:after-record")
        save(ws, rev)
        accept(ctx, owner_key, rev.request_id)
        rev.accepted_ts = time.time()
        save(ws, rev)
    return rev


def _drop_unaccepted(ws: Workspace, owner_key: str) -> None:
    """Records (and needles) of this owner's requests that a crash stopped before acceptance: the owner record never
    pointed at them, nothing acted on them. The caller holds the workspace lock."""
    from cdm.platform.workspace.revocations import all_revocations

    for old in all_revocations(ws):
        if old.owner_key == owner_key and not old.completed:
            needles_path(ws, old.request_id).unlink(missing_ok=True)
            record_path(ws, old.request_id).unlink(missing_ok=True)
    for needles in ws.revocations_dir.glob("rev-*.needles.json") if ws.revocations_dir.exists() else []:
        if not record_path(ws, needles.name.removesuffix(".needles.json")).exists():
            needles.unlink(missing_ok=True)  # a crash between the needles and the record
    # A needles file's temporary copy left by a crash inside its atomic write (only `begin` writes them, under
    # this lock: none is being written now).
    for tmp in ws.revocations_dir.glob(".rev-*.needles.json.*.tmp") if ws.revocations_dir.exists() else []:
        tmp.unlink(missing_ok=True)


def accept(ctx: Context, owner_key: str, request_id: str) -> None:
    """The moment a revocation is accepted (the caller holds the workspace lock): the owner record turns
    `revoked` (nothing of theirs is ingested, planned or registered from here on) and every version that saw them
    is marked unservable (`gate.mark_revoked`)."""
    from cdm.platform.models import gate

    # The marks first: a crash after them leaves the owner's versions unservable (running servers already drop
    # them) and the request unaccepted, which the next `cdm revoke` replaces; the other order would leave an
    # accepted request that running servers know nothing of.
    gate.mark_revoked(ctx, owner_key, request_id)
    fault_point("begin:after-mark")
    owner_records.update(ctx.ws, owner_key, state="revoked", revocation=request_id,
                         drop=("source", "cron", "license", "token_public_key", "token_sha256"))


@contextlib.contextmanager
def runner(ws: Workspace, request_id: str):
    """Hold the request's runner lock (`revocations.runner_lock`), or refuse: another process is on it."""
    from filelock import Timeout

    lock = runner_lock(ws, request_id)
    try:
        lock.acquire()
    except Timeout:
        raise RevocationRunning(f"{request_id} is being processed by another process; `cdm status` shows its "
                                "progress") from None
    try:
        yield
    finally:
        lock.release()


# -- the steps -----------------------------------------------------------------------------------------------
def plan(ctx: Context, rev: Revocation) -> Plan:
    """Which shards drop (only the owner's) and which retrain (shared). Computes only: the shard plan changes in
    `go_live`, after this output is recorded (a crash in between leaves a plan that a rerun computes again)."""
    from cdm.platform.models.composites import production
    from cdm.platform.models.shards import load_plan

    key = rev.owner_key
    if rev.shards is not None:  # the plan as it was at acceptance (a `cdm train` since has left the owner out)
        shard_plan = rev.shards
    else:
        shard_plan = {s: [ctx.ws.owner_key(o) for o in owners] for s, owners in load_plan(ctx.ws).items()}
    prod = production(ctx)
    return Plan(exclusive_shards=sorted(s for s, keys in shard_plan.items() if keys == [key]),
                shared_shards=sorted(s for s, keys in shard_plan.items() if key in keys and len(keys) > 1),
                composite_before=prod[0] if prod else None, estimator=prod[1]["estimator"] if prod else None)


def leave_shard_plan(ctx: Context, owner_key: str) -> None:
    """The owner leaves the shard plan (idempotent); a shard left with no owner is dropped."""
    from cdm.platform.models.shards import load_plan, save_plan

    owner = owner_records.record(ctx.ws, owner_key).owner
    with ctx.ws.lock():
        remaining = {s: [o for o in owners if o != owner] for s, owners in load_plan(ctx.ws).items()}
        save_plan(ctx.ws, {s: owners for s, owners in remaining.items() if owners})


PROMOTE_ATTEMPTS = 5  # compare-and-set retries when another command moves production at the same moment


def go_live(ctx: Context, rev: Revocation, plan: Plan) -> Live:
    """The owner leaves the shard plan; production becomes the composite of its own shards minus every shard that
    saw the owner — nothing is added (an untrained or newer shard waits for `cdm compose`) — moved by a
    compare-and-set (`gate.promote`), retried from the new production if another command moved it meanwhile. A
    router composite goes live as `prior` (training-free) until `retrain` has a router trained without the owner.
    With no shard left, production is removed. Production without the owner is left as it is."""
    from cdm.platform.models import gate
    from cdm.platform.models.composites import NothingToCompose, production, register, spec_without

    leave_shard_plan(ctx, rev.owner_key)
    fault_point("go_live:after-shard-plan")
    for _ in range(PROMOTE_ATTEMPTS):
        prod = production(ctx)
        if prod is None:
            return Live(composite_live=None, estimator=None, seconds_to_live=time.time() - rev.received_ts)
        version, spec = prod
        # This owner's shards, and any other component the gate refuses (another revocation accepted meanwhile).
        drop = {s["id"] for s in spec["shards"] if rev.owner_key in s["owners"]}
        drop |= set(plan.exclusive_shards) | set(plan.shared_shards) | gate.unservable_shards(ctx, spec)
        if not drop & {s["id"] for s in spec["shards"]}:  # already without the owner
            return Live(composite_live=version, estimator=spec["estimator"],
                        seconds_to_live=time.time() - rev.received_ts)
        estimator = "prior" if spec["estimator"] == "router" else spec["estimator"]
        try:
            try:
                live_spec = spec_without(spec, drop, estimator, revocations=[rev.request_id])
            except NothingToCompose:
                gate.unpromote(ctx, expected=version)
                return Live(composite_live=None, estimator=None, seconds_to_live=time.time() - rev.received_ts)
            live = register(ctx, live_spec, grid=False, expected=version, previous=spec)["version"]  # no grid: speed
        except gate.ProductionMoved:
            continue
        return Live(composite_live=live, estimator=estimator, seconds_to_live=time.time() - rev.received_ts)
    raise gate.ProductionMoved(f"production kept moving; run `cdm revoke` again to finish {rev.request_id}")


def retrain(ctx: Context, rev: Revocation, plan: Plan, live: Live, progress: bool = False) -> Retrained:
    """Shared shards retrain without the owner, from their last untouched slice checkpoint; then production as it
    is now (a `cdm compose` may have moved it since going live) with the retrained versions in place — added back
    when going live dropped them — and the original estimator (a router is retrained on exactly those shards'
    data), moved by compare-and-set."""
    from cdm.platform.models import gate
    from cdm.platform.models.composites import NothingToCompose, production, register, spec_with_shards
    from cdm.platform.models.shards import load_plan, train_and_register

    shard_plan, active = load_plan(ctx.ws), set(gate.active_owners(ctx.ws))
    shards = {}
    for sid in plan.shared_shards:
        owners = [o for o in shard_plan.get(sid, []) if o in active]  # another request may be revoking one
        if not owners:
            continue
        t0 = time.time()
        info = train_and_register(ctx, registry.SHARD_PREFIX + sid, owners, progress=progress)
        shards[sid] = {k: info.get(k) for k in ("version", "resumed_from_slice", "steps_run")}
        shards[sid]["wall_seconds"] = round(time.time() - t0, 2)
    router = plan.estimator == "router"
    if plan.composite_before is None or not (shards or router):
        return Retrained(shards=shards, composite_after=live.composite_live, router_retrained=False)
    fault_point("retrain:before-compose")
    for _ in range(PROMOTE_ATTEMPTS):
        prod = production(ctx)
        base = prod[1] if prod else {"shards": [], "revocations": []}
        gone = gate.unservable_shards(ctx, base) - set(shards)
        base = {**base, "shards": [s for s in base["shards"] if s["id"] not in gone]}
        as_live = prod is None or prod[0] == live.composite_live  # nobody composed since going live
        estimator = plan.estimator if as_live else prod[1]["estimator"]
        try:
            spec = spec_with_shards(ctx, base, sorted(shards), estimator, [rev.request_id])
            after = register(ctx, spec, progress=progress, expected=prod[0] if prod else None,
                             previous=prod[1] if prod else None)["version"]
        except NothingToCompose:
            return Retrained(shards=shards, composite_after=None, router_retrained=False)
        except gate.ProductionMoved:
            continue
        return Retrained(shards=shards, composite_after=after, router_retrained=estimator == "router")
    raise gate.ProductionMoved(f"production kept moving; run `cdm revoke` again to finish {rev.request_id}")


def forgetting_check(ctx: Context, rev: Revocation, plan: Plan, retrained: Retrained) -> Forgetting:
    """Membership-inference AUC of the owner's samples vs held-out samples of the same labels, before and after.
    Score: the lowest denoising loss over the composite's shards (an attacker who can query every component)."""
    import torch

    from cdm.metrics import membership_verdict
    from cdm.platform.evaluation.evaluate import base_membership_auc, composite_membership_auc, heldout

    if ctx.params.data.conditioning == "text":
        return Forgetting(skipped="no membership check for text compartments yet")
    try:
        held = heldout(ctx.params)
    except WorkspaceError as e:
        return Forgetting(skipped=str(e))
    owner = owner_records.record(ctx.ws, rev.owner_key).owner
    if not (ctx.ws.owners_dir / owner).exists():
        return Forgetting(skipped="the owner's data was already deleted by an interrupted run")
    d = ctx.params.data
    owner_data = ctx.ws.load_owner(owner, d.image_size, d.channels, d.labels)
    held = held.subset(torch.isin(held.y, owner_data.y.unique()).nonzero().flatten())
    g = torch.Generator().manual_seed(0)
    n = min(len(owner_data), len(held), 300)
    members = owner_data.subset(torch.randperm(len(owner_data), generator=g)[:n])
    nonmembers = held.subset(torch.randperm(len(held), generator=g)[:n])
    versions = {tag: v for tag, v in (("before", plan.composite_before), ("after", retrained.composite_after))
                if v is not None}
    aucs = composite_membership_auc(ctx, versions, members, nonmembers)
    control = base_membership_auc(ctx, members, nonmembers)
    verdict = membership_verdict(aucs.get("before"), aucs.get("after"), n, n, control)
    return Forgetting(n=n, auc_before=aucs.get("before"), auc_after=aucs.get("after"), auc_control=control,
                      verdict=verdict)


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


def reevaluate(ctx: Context, rev: Revocation, retrained: Retrained) -> dict:
    from cdm.platform.evaluation.evaluate import evaluate
    from cdm.platform.models.serving import ShardRevoked

    if retrained.composite_after is None:
        return {"skipped": "nothing is served"}
    if ctx.params.data.conditioning == "text":
        return {"skipped": "a text composite is evaluated by `cdm evaluate` (prompt alignment)"}
    try:
        m = evaluate(ctx)
    except ShardRevoked as e:  # another revocation accepted meanwhile has not gone live yet
        return {"skipped": str(e)}
    out = {k: m[k] for k in ("fid", "fid_ci", "floor_real", "fid_ratio", "fid_ratio_ci", "memorization",
                             "composite_version", "regressions") if k in m}
    out["nll_bpd"] = m["nll"]["composite_bpd"]
    return out


def shared_base(ctx: Context) -> dict | None:
    """The shared initialization as it stands after the purge (None without one): trained on public data only, it
    holds no owner's data, so a revocation deletes compartments (full shards or LoRA adapters) and never it."""
    from cdm.platform.models.weights import UNET_ARTIFACT, WEIGHTS_FILE, sha256_file

    mv = registry.alias_version(ctx.client, registry.INIT, registry.CURRENT)
    if mv is None:
        return None
    with registry.model_files(ctx.client, registry.INIT, str(mv.version), ctx.ws.tmp_dir) as files:
        # A text workspace's base: a StableDiffusionPipeline folder (logged under its own folder's name).
        pipeline = next((d for d in files.iterdir() if (d / "model_index.json").is_file()), None)
        if pipeline is not None:
            from cdm.text.base import base_sha256

            weights = base_sha256(pipeline)
        else:
            weights = sha256_file(files / UNET_ARTIFACT / WEIGHTS_FILE)  # as stored now, not as the tag says
    return {"model": registry.INIT, "version": str(mv.version), "weights_sha256": weights,
            "public_manifest_sha256": mv.tags.get("cdm.public_manifest_sha256"),
            "trained_on": mv.tags.get("cdm.trained_on"),  # a brought base: its owners' statement
            "touched": weights != mv.tags.get("cdm.weights_sha256")}


def certificate(rev: Revocation, base: dict | None = None, text: bool = False) -> dict:
    """The erasure certificate: what was received, what was deleted and retrained, and the verification. `text`:
    a text workspace (its composites carry a prompt prior)."""
    registered = {v for v in (rev.go_live.composite_live if rev.go_live else None,
                              rev.retrain.composite_after if rev.retrain else None) if v is not None}
    return {
        "type": "cdm.erasure-certificate",
        "request_id": rev.request_id, "owner_key": rev.owner_key, "reason": rev.reason,
        "requested_by": rev.requested_by, "received": rev.received,
        "seconds_to_live": round(rev.go_live.seconds_to_live, 3) if rev.go_live else None,
        "seconds_to_complete": round(time.time() - rev.received_ts, 3),
        "completed": now(),
        "shards_dropped": rev.plan.exclusive_shards, "shards_retrained": rev.plan.shared_shards,
        "retraining": rev.retrain.shards if rev.retrain else {},
        "router_retrained": bool(rev.retrain and rev.retrain.router_retrained),
        # A text composite's prompt prior is fitted again, without the owner's captions, by every composite the
        # revocation registers (going live and after retraining).
        "prompt_prior_retrained": None if not text else bool(registered - {rev.plan.composite_before}),
        "composite_before": rev.plan.composite_before, "composite_live": rev.go_live.composite_live,
        "composite_after": rev.retrain.composite_after if rev.retrain else None,
        "purged": rev.purge.model_dump() if rev.purge else None,
        "verification": rev.verify.model_dump() if rev.verify else None,
        "forgetting": rev.forgetting_check.model_dump() if rev.forgetting_check else None,
        "evaluation": rev.reevaluate,
        "shared_base": base,
    }


def certify(ctx: Context, rev: Revocation) -> dict:
    """Ledger entry (keyed, under the lock) with the certificate's hash; the certificate with the ledger anchor as
    an MLflow audit run; the anchor as a tag on the registered composite; the owner record marked revoked. Only
    after a verification that found nothing. Idempotent: a run that died after appending finds its entry (the
    certificate keeps the first run's times). The caller records the certificate and `completed` in one write,
    then deletes the needles."""
    if rev.verify is None or not rev.verify.ok:
        raise VerificationFailed(f"{rev.request_id}: no verification that found nothing; the request stays open",
                                 code=1)
    ws = ctx.ws
    if rev.certificate_draft is None:  # fixed before the ledger names its hash: a rerun certifies the same document
        rev.certificate_draft = certificate(rev, shared_base(ctx), ctx.params.data.conditioning == "text")
        save(ws, rev)
    cert = dict(rev.certificate_draft)
    previous = [e for e in ledger.read(ws.ledger_path) if e.get("request_id") == rev.request_id]
    if previous:
        entry = previous[-1]
    else:
        entry, _ = ledger.record(ws, {
            "event": "revocation", "request_id": cert["request_id"], "owner_key": cert["owner_key"],
            "requested_by": cert["requested_by"], "received": cert["received"], "completed": cert["completed"],
            "shards_dropped": cert["shards_dropped"], "shards_retrained": cert["shards_retrained"],
            "verification_ok": True,
            "certificate_sha256": hashlib.sha256(json.dumps(cert, sort_keys=True).encode()).hexdigest()})
    fault_point("certify:after-ledger")
    registry.anchor_ledger(ctx.client, ledger.head(ledger.read(ws.ledger_path)))
    cert["ledger"] = {"seq": entry["seq"], "hash": entry["hash"]}
    cert["audit_run"] = registry.log_certificate(ctx.client, ctx.artifact_root, cert)
    owner_records.update(ws, rev.owner_key, revoked=cert["completed"])
    return cert


def complete(ctx: Context, rev: Revocation, cert: dict) -> Revocation:
    """The certificate and `completed` in one write, then the needles file goes (a crash in between leaves a file
    that `sweep_needles` removes at the next command)."""
    rev.certify, rev.completed = cert, True
    save(ctx.ws, rev)
    fault_point("certify:after-complete")
    needles_path(ctx.ws, rev.request_id).unlink(missing_ok=True)
    return rev
