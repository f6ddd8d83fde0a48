"""The serving invariant, enforced in one place (docs/design.md §5):

    Once a revocation is accepted, no model version whose training data included that owner is ever made
    `production`, loaded by a serving process, or used to build a composite.

How each path is held to it:

    accept     `mark_revoked`, under the workspace lock: every registered version that saw the owner (and every
               composite of such a version) is tagged `cdm.revoked=<request>`, and the registry's revocation epoch
               moves on. The owner record turns `revoked` in the same critical section (`forgetting.begin`).
    train      `active_owners` leaves owners under revocation out of every plan; a new version is created under
               the lock only if none of its owners is revoked (`admit_owners`), else its run is discarded.
    compose    `servable` picks, per shard, the newest version that is not marked and saw no revoked owner.
    promote    the only way `production` moves: a compare-and-set under the lock that refuses a marked version, a
               composite with a marked component, or one that names a revoked owner.
    serve      the served composite (`serving.CompositeModel`) compares the epoch before and after each request and
               drops marked or deleted components without a restart.

The workspace lock (`Workspace.lock`) serializes accept, register and promote: whichever comes first, the other
sees its effect.
"""

from __future__ import annotations

import contextlib
import json

from cdm.platform.workspace import owner_records
from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.workspace.paths import Workspace


class Refused(WorkspaceError):
    """A version that saw an owner under revocation may not be registered, composed or served."""


class ProductionMoved(WorkspaceError):
    """`production` is no longer the version a compare-and-set expected (another command moved it)."""


def revoked_owner_keys(ws: Workspace) -> dict[str, str]:
    """{owner key: request id} of every owner whose revocation was accepted (in progress or completed) and who
    has not consented again."""
    return {k: r.revocation or "revoked" for k, r in owner_records.records(ws).items() if r.state == "revoked"}


# `cdm train`'s refusal with no owner to plan, worded once for the command's check before any flow and the flow.
NO_OWNERS = "no owners in the workspace; ingest data first"


def active_owners(ws: Workspace) -> list[str]:
    """Owners with data in the workspace, minus those under revocation (their folder stays until the purge)."""
    revoked = {r.owner for r in owner_records.records(ws).values() if r.state == "revoked"}
    return [o for o in ws.owners() if o not in revoked]


def _keys(mv) -> set[str]:
    return set(json.loads(mv.tags.get("cdm.owner_keys", "[]")))


def _components(mv) -> set[tuple[str, str]]:
    return {(registry.SHARD_PREFIX + s, str(v)) for s, v in json.loads(mv.tags.get("cdm.components", "{}")).items()}


def mark_revoked(ctx: Context, owner_key: str, request_id: str) -> list[str]:
    """Tag every version that saw the owner, and every composite built on one, `cdm.revoked=<request_id>`; move
    the revocation epoch on. The caller holds the workspace lock. Idempotent (a resumed request marks again).
    Returns the versions marked, as `name/version`."""
    c = ctx.client
    every = registry.all_versions(c)
    tainted = {(mv.name, str(mv.version)) for mv in every if mv.name != registry.COMPOSITE and owner_key in _keys(mv)}
    tainted |= {(mv.name, str(mv.version)) for mv in every if mv.name == registry.COMPOSITE
                and (owner_key in _keys(mv) or _components(mv) & tainted)}
    for name, version in sorted(tainted):
        c.set_model_version_tag(name, version, registry.REVOKED, request_id)
    registry.bump_revocation_epoch(c)
    return [f"{n}/{v}" for n, v in sorted(tainted)]


def why_unservable(ctx: Context, mv, revoked_keys: dict[str, str] | None = None) -> str | None:
    """Why this registered version may not be served (None: it may)."""
    revoked_keys = revoked_owner_keys(ctx.ws) if revoked_keys is None else revoked_keys
    if mv.tags.get(registry.REVOKED):
        return f"{mv.name} v{mv.version} was trained on an owner under revocation ({mv.tags[registry.REVOKED]})"
    named = sorted(_keys(mv) & set(revoked_keys))
    if named:
        return f"{mv.name} v{mv.version} was trained on {named[0]}, under revocation ({revoked_keys[named[0]]})"
    for name, version in sorted(_components(mv)):
        why = registry.revoked_by(ctx.client, name, version)
        if why:
            return f"{mv.name} v{mv.version} uses {name} v{version}, " + (
                "which was deleted" if why == "deleted" else f"trained on an owner under revocation ({why})")
    return None


def unservable_shards(ctx: Context, spec: dict) -> set[str]:
    """Ids of the spec's shards that may not be served: marked or deleted versions, or ones naming an owner under
    revocation (this request's or another's)."""
    revoked_keys = set(revoked_owner_keys(ctx.ws))
    return {s["id"] for s in spec["shards"] if set(s["owners"]) & revoked_keys
            or registry.revoked_by(ctx.client, s["model"], s["version"])}


def servable(ctx: Context, name: str):
    """The newest version of `name` that may be served, or None."""
    revoked_keys = revoked_owner_keys(ctx.ws)
    for mv in reversed(registry.versions(ctx.client, name)):
        if why_unservable(ctx, mv, revoked_keys) is None:
            return mv
    return None


@contextlib.contextmanager
def admit_owners(ctx: Context, owner_keys: list[str]):
    """Hold the workspace lock while a version of these owners' data is created; refuse if one is revoked."""
    with ctx.ws.lock():
        revoked = sorted(set(owner_keys) & set(revoked_owner_keys(ctx.ws)))
        if revoked:
            raise Refused(f"owner {revoked[0]} is under revocation; a model of their data is not registered")
        yield


ANY = object()  # `promote` without an expectation: move production from whatever it is


def promote(ctx: Context, version: str, expected: str | None | object = ANY) -> None:
    """Make composite `version` production: the one way the alias moves. Under the workspace lock, refuses a
    version that may not be served (Refused) and, when `expected` is given, a production that moved since the
    caller read it (ProductionMoved; `None` expects no production)."""
    c = ctx.client
    with ctx.ws.lock():
        current = registry.alias_version(c, registry.COMPOSITE)
        current_version = None if current is None else str(current.version)
        if expected is not ANY and current_version != expected:
            raise ProductionMoved(f"production moved from v{expected} to v{current_version}")
        why = why_unservable(ctx, c.get_model_version(registry.COMPOSITE, version))
        if why:
            raise Refused(why)
        c.set_registered_model_alias(registry.COMPOSITE, registry.PRODUCTION, version)


def check_servable(ctx: Context, version: str) -> None:
    """Refuse (Refused) a composite version that may not be served: what a candidate must pass to be registered."""
    why = why_unservable(ctx, ctx.client.get_model_version(registry.COMPOSITE, version))
    if why:
        raise Refused(why)


def unpromote(ctx: Context, expected: str) -> None:
    """Serve nothing (a revocation that leaves no shard), if production is still `expected`."""
    c = ctx.client
    with ctx.ws.lock():
        current = registry.alias_version(c, registry.COMPOSITE)
        if current is not None and str(current.version) != expected:
            raise ProductionMoved(f"production moved from v{expected} to v{current.version}")
        if current is not None:
            c.delete_registered_model_alias(registry.COMPOSITE, registry.PRODUCTION)


@contextlib.contextmanager
def admit_run(ctx: Context, keys: list[str], run_id: str):
    """`admit_owners` for a training run's new version: a refusal carries the run's id (the caller discards the
    run once it has ended)."""
    try:
        with admit_owners(ctx, keys):
            yield
    except Refused as e:
        e.run_id = run_id
        raise
