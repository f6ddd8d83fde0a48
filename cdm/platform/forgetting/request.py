"""A revocation request: its typed record and its acceptance (docs/design.md §5).

    begin (accept) -> plan -> go_live -> retrain -> forgetting_check -> purge -> verify -> reevaluate -> certify

Each step is one module of this package holding its typed output (its field of `Revocation`), its logic, the writes
it makes and its fault points, and a `run(ctx, revocation, inputs...)` that returns the recorded output or runs the
step and records it (`record.recorded`) before the next starts: a run that died anywhere is finished by running it
again, and `cdm status` reads progress from the record. `tasks/unlearn.py` runs each as one Prefect task. The owner's
raw id is read from the owner record when a step needs it, never stored in the record.

Needles for the final scan (the token's public key, the owner's sample hashes and files, DVC object ids) are taken
at `begin`, while the data still exists, into `<request_id>.needles.json` beside the record (0600): a run resumed
after the purge searches for the same; `certify.complete` deletes that file.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Literal

from pydantic import BaseModel

from cdm.platform.forgetting.forgetting_check import Forgetting
from cdm.platform.forgetting.go_live import Live
from cdm.platform.forgetting.needles import write_needles
from cdm.platform.forgetting.plan import Plan
from cdm.platform.forgetting.purge import PurgeIntent, Purged
from cdm.platform.forgetting.record import fault_point, needles_path, record_path, runner_lock, save
from cdm.platform.forgetting.retrain import Retrained
from cdm.platform.forgetting.verification import Verification
from cdm.platform.workspace import owner_records
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.workspace.paths import Workspace, now

STEPS = ("plan", "go_live", "retrain", "forgetting_check", "purge", "verify", "reevaluate", "certify")


class AlreadyRevoked(WorkspaceError):
    pass


class RevocationRunning(WorkspaceError):
    """Another process is working on this request (one runner per request)."""


class Revocation(BaseModel):
    request_id: str
    owner_key: str
    received: str
    received_ts: float
    reason: str | None = None
    requested_by: Literal["owner", "operator"] = "operator"
    # How the request came: a command (the token, if any, was checked in that process) or a Prefect event (its
    # payload, the token's sha256, is then stored by Prefect as the request's proof).
    requested_via: Literal["command", "event"] = "command"
    shards: dict[str, list[str]] | None = None  # the shard plan's shards holding the owner at acceptance (keys)
    accepted_ts: float | None = None  # when the marks and the owner record were written (the request took effect)
    plan: Plan | None = None
    go_live: Live | None = None
    retrain: Retrained | None = None
    forgetting_check: Forgetting | None = None
    purge_intent: PurgeIntent | None = None  # recorded first thing in `purge`
    purge: Purged | None = None
    verify: Verification | None = None
    # Verifications that found something: each reopened the purge (the request stays open until one is ok).
    failed_verifications: list[dict] = []
    reevaluate: dict | None = None
    certificate_draft: dict | None = None  # the certificate as the ledger entry hashes it (written first)
    certify: dict | None = None  # the certificate
    completed: bool = False

    @property
    def steps_done(self) -> list[str]:
        return [s for s in STEPS if getattr(self, s) is not None]

    @property
    def next_step(self) -> str | None:
        return next((s for s in STEPS if getattr(self, s) is None), None)


def load(ws: Workspace, request_id: str) -> Revocation:
    return Revocation.model_validate_json(record_path(ws, request_id).read_text())


def all_revocations(ws: Workspace) -> list[Revocation]:
    if not ws.revocations_dir.exists():
        return []
    return [Revocation.model_validate_json(p.read_text()) for p in sorted(ws.revocations_dir.glob("rev-*.json"))
            if not p.name.endswith(".needles.json")]


def sweep_needles(ws: Workspace) -> list[str]:
    """Delete the needles file of every completed request (a crash between completion and the deletion leaves
    one; it holds the owner's sample hashes, which must not outlive the certificate)."""
    swept = []
    for rev in all_revocations(ws):
        path = needles_path(ws, rev.request_id)
        if rev.completed and path.exists():
            path.unlink(missing_ok=True)
            swept.append(rev.request_id)
    return swept


def revoked_membership(ws: Workspace) -> dict[str, Forgetting]:
    """The membership check (AUC after, verdict with its positive control) of each revoked owner, as measured when
    it was revoked (their data is gone now), by owner key: what `evaluate` reports beside the composite's figures."""
    return {r.owner_key: r.forgetting_check for r in all_revocations(ws)
            if r.completed and r.forgetting_check is not None and r.forgetting_check.auc_after is not None}


# -- acceptance ----------------------------------------------------------------------------------------------
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


@contextlib.contextmanager
def runner(ws: Workspace, request_id: str):
    """Hold the request's runner lock (`record.runner_lock`), or refuse: another process is on it."""
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
