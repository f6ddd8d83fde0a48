"""Step `reevaluate`: the composite served after the revocation, measured as `cdm evaluate` measures it."""

from __future__ import annotations

from cdm.platform.forgetting.record import Retrained, Revocation, recorded, revoked_membership
from cdm.platform.workspace.context import Context


def reevaluate(ctx: Context, rev: Revocation, retrained: Retrained) -> dict:
    from cdm.platform.evaluation.evaluate import evaluate
    from cdm.platform.models.serving import ShardRevoked

    if retrained.composite_after is None:
        return {"skipped": "nothing is served"}
    if ctx.params.data.conditioning == "text":
        return {"skipped": "a text composite is evaluated by `cdm evaluate` (prompt alignment)"}
    try:
        m = evaluate(ctx, revoked=revoked_membership(ctx.ws))
    except ShardRevoked as e:  # another revocation accepted meanwhile has not gone live yet
        return {"skipped": str(e)}
    out = {k: m[k] for k in ("fid", "fid_ci", "floor_real", "fid_ratio", "fid_ratio_ci", "memorization",
                             "composite_version", "regressions") if k in m}
    out["nll_bpd"] = m["nll"]["composite_bpd"]
    return out


def run(ctx: Context, rev: Revocation, retrained: Retrained) -> dict:
    return recorded(ctx.ws, rev, "reevaluate", lambda: reevaluate(ctx, rev, retrained))
