"""Step `plan`: which of the owner's shards drop and which retrain. Computes only: the shard plan changes in
`go_live`, after this output is recorded (a crash in between leaves a plan that a rerun computes again)."""

from __future__ import annotations

from cdm.platform.forgetting.record import Plan, Revocation, recorded
from cdm.platform.workspace.context import Context


def plan(ctx: Context, rev: Revocation) -> Plan:
    """Which shards drop (only the owner's) and which retrain (shared), from the shard plan as it was at acceptance,
    and the production composite now."""
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


def run(ctx: Context, rev: Revocation) -> Plan:
    return recorded(ctx.ws, rev, "plan", lambda: plan(ctx, rev))
