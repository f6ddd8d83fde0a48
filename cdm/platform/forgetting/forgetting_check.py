"""Step `forgetting_check`: the membership attack on the owner's samples, before and after, with its control."""

from __future__ import annotations

from cdm.platform.forgetting.record import Forgetting, Plan, Retrained, Revocation, recorded
from cdm.platform.workspace import owner_records
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError


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


def run(ctx: Context, rev: Revocation, plan: Plan, retrained: Retrained) -> Forgetting:
    return recorded(ctx.ws, rev, "forgetting_check", lambda: forgetting_check(ctx, rev, plan, retrained))

