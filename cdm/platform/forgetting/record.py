"""A revocation's record: its schema, where it lives, and how each step writes its part of it (docs/design.md §5).

The record is `.cdm/revocations/<request_id>.json` (`Revocation`: the request, then one typed field per step); the
needles the final scan searches for lie beside it in `<request_id>.needles.json` (0600). Each step module calls
`recorded` with its own logic: the output already recorded (a rerun after a crash skips what is done), or the
logic's, written before it is returned, so the next step never starts on an output that is not on disk. Every step
module imports this one and this one imports none of them: the record is the one thing they share. Nothing in it
names the owner by raw id.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Callable, Literal, TypeVar

from pydantic import BaseModel

from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.workspace.fileio import atomic_write
from cdm.platform.workspace.paths import Workspace

STEPS = ("plan", "go_live", "retrain", "forgetting_check", "purge", "verify", "reevaluate", "certify")


class Plan(BaseModel):
    exclusive_shards: list[str]  # only the owner's data: dropped
    shared_shards: list[str]  # the owner and others: retrained without the owner
    composite_before: str | None  # production version when the request came
    estimator: str | None


class Live(BaseModel):
    composite_live: str | None  # production without every shard that saw the owner (None: nothing left to serve)
    estimator: str | None
    seconds_to_live: float


class Retrained(BaseModel):
    shards: dict[str, dict]  # shard -> {version, resumed_from_slice, steps_run, wall_seconds}
    composite_after: str | None
    router_retrained: bool


class Forgetting(BaseModel):
    n: int = 0
    auc_before: float | None = None
    auc_after: float | None = None
    auc_control: float | None = None  # the shared base (saw neither set) on the same images; None: no base
    verdict: str = "not measured"  # `membership_verdict` (95% intervals): met only if the attack fired before
    skipped: str | None = None


class PurgeIntent(BaseModel):
    """What the purge will delete, recorded before it deletes anything: a rerun after a crash inside the purge
    deletes at least this, even once the tags and local files it was derived from are gone."""
    versions: list[tuple[str, str]]  # (registered model, version)
    registered_models: list[str]  # deleted whole (the owner's exclusive shards)
    runs: list[str] = []  # runs that name the owner and registered nothing (a training refused or killed)
    # (The owner's DVC object ids are not here: they are needles, kept in the needles file taken at `begin`, which
    # the scan skips and completion deletes; no ingestion of the owner can add objects after `begin`.)
    paths: list[str]  # workspace-relative files and folders (checkpoints, reports)


class Purged(BaseModel):
    versions: list[str]
    runs: list[str]
    logged_models: list[str]
    registered_models: list[str]
    paths: list[str]
    objects: dict[str, int]  # {"cache": n, "remote": n}
    data_hash: str | None
    seconds: float
    prefect_logs: int = 0  # Prefect log lines that named the owner, deleted


class Verification(BaseModel):
    ok: bool
    mlflow: dict  # versions and runs still there, tags still naming the owner key
    dvc: dict  # the owner's objects still in cache and remote
    scan: dict  # ScanReport.as_dict(): stores scanned, findings
    pixel_search: bool  # the sample files and their decoded pixels were searched too
    needles: dict[str, int] = {}  # how many needles of each kind were searched for
    needles_missing: dict[str, list[int]] = {}  # kinds searched less than the needles file asks: [searched, asked]


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


class RevocationRunning(WorkspaceError):
    """Another process is working on this request (one runner per request)."""


Output = TypeVar("Output")


def record_path(ws: Workspace, request_id: str) -> Path:
    return ws.revocations_dir / f"{request_id}.json"


def needles_path(ws: Workspace, request_id: str) -> Path:
    return ws.revocations_dir / f"{request_id}.needles.json"


def save(ws: Workspace, rev: Revocation) -> Revocation:
    atomic_write(record_path(ws, rev.request_id), rev.model_dump_json(indent=2))
    return rev


def recorded(ws: Workspace, rev: Revocation, step: str, run: Callable[[], Output]) -> Output:
    """The step's recorded output, or `run()`'s, recorded before it is returned."""
    done = getattr(rev, step)
    if done is not None:
        return done
    output = run()
    setattr(rev, step, output)
    save(ws, rev)
    return output


def runner_lock(ws: Workspace, request_id: str):
    """One process at a time works on a request (its steps are not meant to run twice at once). A file lock the
    kernel drops when its holder dies, kill -9 included."""
    from filelock import FileLock

    ws.revocations_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(ws.revocations_dir / f"{request_id}.lock", timeout=0, thread_local=False)


# Fault-injection points a test arms with CDM_FAULT=<point> (the process kills itself there with SIGKILL, as a
# crash would): one inside every step that writes, between its writes (tests/flows/test_faults.py).
def fault_point(name: str) -> None:
    if os.environ.get("CDM_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


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


@contextlib.contextmanager
def runner(ws: Workspace, request_id: str):
    """Hold the request's runner lock (`runner_lock`), or refuse: another process is on it."""
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
