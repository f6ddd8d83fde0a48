"""Step `begin`: a revocation accepted (or resumed), under the workspace lock — its record and needles first, then
the owner record `revoked` and every version that saw them marked unservable (docs/design.md §5)."""

from __future__ import annotations

import time
import uuid

from cdm.platform.forgetting.needles import write_needles
from cdm.platform.forgetting.record import (Revocation, all_revocations, fault_point, load, needles_path, record_path, save,
                                           sweep_needles)
from cdm.platform.workspace import owner_records
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.workspace.paths import Workspace, now


class AlreadyRevoked(WorkspaceError):
    pass


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
