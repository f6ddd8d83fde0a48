"""Step `go_live`: the owner leaves the shard plan and production drops every shard that saw them."""

from __future__ import annotations

import time
from cdm.platform.forgetting.record import Live, Plan, Revocation, fault_point, recorded
from cdm.platform.workspace import owner_records
from cdm.platform.workspace.context import Context

PROMOTE_ATTEMPTS = 5  # compare-and-set retries when another command moves production at the same moment


def leave_shard_plan(ctx: Context, owner_key: str) -> None:
    """The owner leaves the shard plan (idempotent); a shard left with no owner is dropped."""
    from cdm.platform.models.shards import load_plan, save_plan

    owner = owner_records.record(ctx.ws, owner_key).owner
    with ctx.ws.lock():
        remaining = {s: [o for o in owners if o != owner] for s, owners in load_plan(ctx.ws).items()}
        save_plan(ctx.ws, {s: owners for s, owners in remaining.items() if owners})


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


def run(ctx: Context, rev: Revocation, plan: Plan) -> Live:
    return recorded(ctx.ws, rev, "go_live", lambda: go_live(ctx, rev, plan))
