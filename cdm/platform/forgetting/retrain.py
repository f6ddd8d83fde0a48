"""Step `retrain`: shared shards retrain without the owner, then production gets them back."""

from __future__ import annotations

import time
from cdm.platform.forgetting.go_live import PROMOTE_ATTEMPTS
from cdm.platform.forgetting.record import Live, Plan, Retrained, Revocation, fault_point, recorded
from cdm.platform.models import cleanup, registry
from cdm.platform.workspace.context import Context


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


def run(ctx: Context, rev: Revocation, plan: Plan, live: Live, progress: bool = False) -> Retrained:
    """Runs a killed training left open are ended first (their checkpoints are resumed from, their runs not)."""
    cleanup.sweep_dead_runs(ctx.client, ctx.backend, ctx.experiment_id)
    return recorded(ctx.ws, rev, "retrain", lambda: retrain(ctx, rev, plan, live, progress))
