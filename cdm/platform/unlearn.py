"""Owner-triggered unlearning as a typed state machine (docs/design.md §5).

    begin -> plan -> go_live -> retrain -> forgetting_check -> purge -> verify -> reevaluate -> certify

`Revocation` is the crash-safe record (`.cdm/revocations/<request_id>.json`): each step's typed output is stored
before the next step starts, so a run that died anywhere is finished by running it again, and `cdm status` reads
progress from it. Each step is a function `(ctx, revocation, inputs...) -> output`; `tasks/unlearn.py` runs each
as one Prefect task. The owner's raw id is read from the owner record when a step needs it, never stored here.

Needles for the final scan (the owner's sample hashes, DVC object ids) are taken at `begin`, while the data still
exists, into `<request_id>.needles.json` beside the record (0600); `certify` deletes that file. The verification
step lives in `cdm.platform.verification`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

import torch

from cdm.platform import cleanup, dvc, ledger, owner_records, registry
from cdm.platform.context import Context
from cdm.platform.errors import WorkspaceError
from cdm.platform.gitrepo import commit
from cdm.platform.revocations import Forgetting, Live, Plan, Purged, Retrained, Revocation, load, needles_path, save
from cdm.platform.verification import owner_objects, write_needles
from cdm.platform.workspace import Workspace, now

class AlreadyRevoked(WorkspaceError):
    pass


def begin(ctx: Context, owner_key: str, token_sha256: str | None = None, reason: str | None = None,
          via: str = "command") -> Revocation:
    """Accept (or resume) the revocation of the owner `owner_key`.

    From here on the owner's consent is withdrawn: any ingestion of them is refused (owner record `revoked`; source,
    schedule, license and token hash dropped). `token_sha256` proves an owner's own request; without it the request
    is the operator's. Refuses unknown and already revoked owners.
    """
    ws = ctx.ws
    with ws.lock():
        rec = owner_records.record(ws, owner_key)
        if rec is None or (rec.state != "revoked" and rec.owner not in ws.owners()):
            raise WorkspaceError(f"unknown owner {owner_key}")
        if rec.state == "revoked" and rec.revocation:
            existing = load(ws, rec.revocation)
            if existing.completed:
                raise AlreadyRevoked(f"owner {owner_key} was already revoked (request {existing.request_id})")
            return existing  # resume
        requested_by = "operator"
        if token_sha256 is not None:
            if not owner_records.token_matches(rec, token_sha256):
                raise PermissionError(f"the token does not belong to owner {owner_key}")
            requested_by = "owner"
        rev = Revocation(request_id="rev-" + uuid.uuid4().hex[:12], owner_key=owner_key, received=now(),
                         received_ts=time.time(), reason=reason, requested_by=requested_by, requested_via=via)
        write_needles(ctx, rec.owner, rec.token_sha256, needles_path(ws, rev.request_id))
        save(ws, rev)
        owner_records.update(ws, owner_key, state="revoked", revocation=rev.request_id,
                             drop=("source", "cron", "license", "token_sha256"))
    return rev


# -- the steps -----------------------------------------------------------------------------------------------
def plan(ctx: Context, rev: Revocation) -> Plan:
    """Which shards drop (only the owner's) and which retrain (shared); the owner leaves the shard plan."""
    from cdm.platform.composites import production
    from cdm.platform.shards import load_plan, save_plan

    owner = owner_records.record(ctx.ws, rev.owner_key).owner
    with ctx.ws.lock():
        shard_plan = load_plan(ctx.ws)
        prod = production(ctx)
        out = Plan(exclusive_shards=sorted(s for s, owners in shard_plan.items() if owners == [owner]),
                   shared_shards=sorted(s for s, owners in shard_plan.items() if owner in owners and len(owners) > 1),
                   composite_before=prod[0] if prod else None, estimator=prod[1]["estimator"] if prod else None)
        remaining = {s: [o for o in owners if o != owner] for s, owners in shard_plan.items()}
        save_plan(ctx.ws, {s: owners for s, owners in remaining.items() if owners})
    return out


def go_live(ctx: Context, rev: Revocation, plan: Plan) -> Live:
    """Production becomes the composite of its own shards minus every shard that saw the owner — nothing is added
    (an untrained or newer shard waits for `cdm compose`). A router composite goes live as `prior` (training-free)
    until `retrain` has a router trained without the owner. With no shard left, production is removed."""
    from cdm.platform.composites import NothingToCompose, production, register, spec_without

    prod = production(ctx)
    if prod is None:
        return Live(composite_live=None, estimator=None, seconds_to_live=time.time() - rev.received_ts)
    estimator = "prior" if prod[1]["estimator"] == "router" else prod[1]["estimator"]
    try:
        spec = spec_without(prod[1], set(plan.exclusive_shards) | set(plan.shared_shards), estimator,
                            revocations=[rev.request_id])
        live = register(ctx, spec, grid=False)["version"]  # the grid waits: speed first
    except NothingToCompose:
        ctx.client.delete_registered_model_alias(registry.COMPOSITE, registry.PRODUCTION)
        live, estimator = None, None
    return Live(composite_live=live, estimator=estimator, seconds_to_live=time.time() - rev.received_ts)


def retrain(ctx: Context, rev: Revocation, plan: Plan, live: Live, progress: bool = False) -> Retrained:
    """Shared shards retrain without the owner, from their last untouched slice checkpoint; then the composite of
    the shards that were served before, minus the owner's exclusive ones, with the retrained versions and the
    original estimator (a router is retrained on exactly those shards' data)."""
    from cdm.platform.composites import NothingToCompose, register, spec_of, spec_with_shards, spec_without
    from cdm.platform.shards import load_plan, train_and_register

    shard_plan = load_plan(ctx.ws)
    shards = {}
    for sid in plan.shared_shards:
        t0 = time.time()
        info = train_and_register(ctx, registry.SHARD_PREFIX + sid, shard_plan[sid], progress=progress)
        shards[sid] = {k: info.get(k) for k in ("version", "resumed_from_slice", "steps_run")}
        shards[sid]["wall_seconds"] = round(time.time() - t0, 2)
    after, router = live.composite_live, plan.estimator == "router"
    if plan.composite_before is not None and (shards or router):
        try:
            base = spec_without(spec_of(ctx, plan.composite_before), set(plan.exclusive_shards), plan.estimator,
                                [rev.request_id])
            after = register(ctx, spec_with_shards(ctx, base, sorted(shards), plan.estimator, [rev.request_id]),
                             progress=progress)["version"]
        except NothingToCompose:
            after = None
    return Retrained(shards=shards, composite_after=after, router_retrained=router and after is not None)


def forgetting_check(ctx: Context, rev: Revocation, plan: Plan, retrained: Retrained) -> Forgetting:
    """Membership-inference AUC of the owner's samples vs held-out samples of the same labels, before and after.
    Score: the lowest denoising loss over the composite's shards (an attacker who can query every component)."""
    from cdm.metrics import membership_verdict
    from cdm.platform.evaluate import composite_membership_auc, heldout

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
    verdict = membership_verdict(aucs.get("before"), aucs.get("after"), ctx.params.evaluate.membership_auc_max)
    return Forgetting(n=n, auc_before=aucs.get("before"), auc_after=aucs.get("after"), verdict=verdict)


def purge(ctx: Context, rev: Revocation, plan: Plan, live: Live, retrained: Retrained) -> Purged:
    """Delete everything derived from the owner's data."""
    t0 = time.time()
    ws, c, key = ctx.ws, ctx.client, rev.owner_key
    owner = owner_records.record(ws, key).owner
    # 1. MLflow: every shard, paragon and composite version that saw the owner, except the live composites.
    keep = {live.composite_live, retrained.composite_after} - {None}
    versions, whole, tainted = [], [], set()
    for sid in plan.exclusive_shards:
        name = registry.SHARD_PREFIX + sid
        versions += [(name, str(mv.version)) for mv in registry.versions(c, name)]
        whole.append(name)
    for name in registry.registered_names(c, registry.SHARD_PREFIX) + [registry.PARAGON]:
        for mv in registry.versions(c, name):
            if key in json.loads(mv.tags.get("cdm.owner_keys", "[]")):
                versions.append((name, str(mv.version)))
                tainted.add((name, str(mv.version)))
    for mv in registry.versions(c, registry.COMPOSITE):
        components = json.loads(mv.tags.get("cdm.components", "{}"))
        saw = any((registry.SHARD_PREFIX + s, str(v)) in tainted for s, v in components.items())
        if (saw or key in json.loads(mv.tags.get("cdm.owner_keys", "[]"))) and str(mv.version) not in keep:
            versions.append((registry.COMPOSITE, str(mv.version)))
    mlflow_result = cleanup.purge(c, ctx.backend, sorted(set(versions)), whole)
    # 2. Checkpoints, validation reports and evaluation outputs that name the owner's key.
    removed = []
    for sid in plan.exclusive_shards:
        removed += _remove(ws, ws.checkpoints_dir / sid)
    for sid in plan.shared_shards:
        mv = registry.latest(c, registry.SHARD_PREFIX + sid)
        current = set(json.loads(mv.tags["cdm.slice_keys"])) if mv else set()
        for f in (ws.checkpoints_dir / sid).glob("*.safetensors"):
            if f.stem not in current:
                removed += _remove(ws, f)
    for report in ws.reports_dir.glob(f"ingest-{key}-*") if ws.reports_dir.exists() else []:
        removed += _remove(ws, report)
    # 3. Data, under the lock: an interrupted ingestion is undone first (so no staging copy of anyone's data is
    #    left half-committed), then the owner's folder, a new DVC version, and the owner's objects in cache and remote.
    from cdm.platform.ingest import recover_interrupted

    with ws.lock():
        recover_interrupted(ctx)
        objects = owner_objects(ws, owner)
        removed += [p.replace(f"owners/{owner}", f"owners/<{key}>") for p in _remove(ws, ws.owners_dir / owner)]
        data_hash = dvc.add_and_push(ws.root, retry_delays=ctx.params.data.push_retry_delays)
        commit(ws.root, f"data: revoke {key}", "data.dvc")
        held = {dvc.md5_bytes(p.read_bytes()) for p in ws.owners_dir.rglob("*") if p.is_file()}
        deleted = dvc.delete_objects(ws.root, (objects - held) - {data_hash or ""}, s3_client=ctx.dvc_s3())
    return Purged(**mlflow_result, paths=removed, objects={k: len(v) for k, v in deleted.items()},
                  data_hash=data_hash, seconds=round(time.time() - t0, 2))


def _remove(ws: Workspace, path: Path) -> list[str]:
    if not path.exists():
        return []
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return [str(path.relative_to(ws.root))]


def reevaluate(ctx: Context, rev: Revocation, retrained: Retrained) -> dict:
    from cdm.platform.evaluate import evaluate

    if retrained.composite_after is None:
        return {"skipped": "nothing is served"}
    m = evaluate(ctx)
    out = {k: m[k] for k in ("fid", "fid_ci", "floor_real", "kid", "fid_ratio", "fid_ratio_ci", "memorization",
                             "composite_version", "regressions") if k in m}
    out["nll_bpd"] = m["nll"]["composite_bpd"]
    return out


def certificate(rev: Revocation) -> dict:
    """The erasure certificate: what was received, what was deleted and retrained, and the verification."""
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
        "composite_before": rev.plan.composite_before, "composite_live": rev.go_live.composite_live,
        "composite_after": rev.retrain.composite_after if rev.retrain else None,
        "purged": rev.purge.model_dump() if rev.purge else None,
        "verification": rev.verify.model_dump() if rev.verify else None,
        "forgetting": rev.forgetting_check.model_dump() if rev.forgetting_check else None,
        "evaluation": rev.reevaluate,
    }


def certify(ctx: Context, rev: Revocation) -> dict:
    """Ledger entry (keyed, under the lock) with the certificate's hash; the certificate with the ledger anchor as
    an MLflow audit run; the anchor as a tag on the registered composite; the owner record marked revoked; the
    needles file deleted."""
    cert = certificate(rev)
    ws = ctx.ws
    # Idempotent: a run that died after appending finds its entry (the certificate keeps the first run's times).
    previous = [e for e in ledger.read(ws.ledger_path) if e.get("request_id") == rev.request_id]
    if previous:
        cert["completed"] = previous[-1]["completed"]
        entry = previous[-1]
    else:
        entry, _ = ledger.record(ws, {
            "event": "revocation", "request_id": cert["request_id"], "owner_key": cert["owner_key"],
            "requested_by": cert["requested_by"], "received": cert["received"], "completed": cert["completed"],
            "shards_dropped": cert["shards_dropped"], "shards_retrained": cert["shards_retrained"],
            "verification_ok": bool((cert["verification"] or {}).get("ok")),
            "certificate_sha256": hashlib.sha256(json.dumps(cert, sort_keys=True).encode()).hexdigest()})
    registry.anchor_ledger(ctx.client, ledger.head(ledger.read(ws.ledger_path)))
    cert["ledger"] = {"seq": entry["seq"], "hash": entry["hash"]}
    cert["audit_run"] = registry.log_certificate(ctx.client, ctx.artifact_root, cert)
    owner_records.update(ws, rev.owner_key, revoked=cert["completed"])
    needles_path(ws, rev.request_id).unlink(missing_ok=True)
    return cert
