"""Unlearning flow, owner-triggered: `cdm revoke OWNER`, or the `cdm.owner.revoked` event under `cdm serve`.

    plan -> go-live -> remove-ingestion-schedule -> retrain -> forgetting-check -> purge -> verify -> reevaluate
         -> certify                                   (one Prefect task each; outputs feed the next tasks)

Parameters are the owner key and, for a request that comes as an event, the owner's signature over it and its time
(`owner_records.sign_revocation`): never the token or the raw id (Prefect stores flow parameters), and nothing a
reader of Prefect's database could reuse for another request. `cdm revoke` checks the token itself and begins the
request before the flow runs, so no proof reaches Prefect on that path. `until="go_live"` stops once the owner is out of serving; running the
flow again finishes the job (each step is recorded, see cdm/platform/forgetting/record.py).
"""

from __future__ import annotations

from contextvars import ContextVar
from datetime import datetime
from typing import Literal

from prefect import flow

from cdm.platform.forgetting import begin, record
from cdm.platform.forgetting.needles import needles
from flows import load_served
from tasks import unlearn as steps


# The owner's token in clear, when this process was given it (`cdm revoke --token`, or the background process it
# starts, through a pipe): the verification scan searches every store for it. Never a flow parameter.
known_token: ContextVar[str | None] = ContextVar("known_token", default=None)


@flow(name="cdm-unlearn", flow_run_name="unlearn-{owner_key}")
def unlearn_owner(workspace: str, owner_key: str, signature: str | None = None, issued_at: float | None = None,
                  reason: str | None = None, received: datetime | None = None,
                  until: Literal["go_live"] | None = None, progress: bool = False) -> dict:
    """Revoke the owner: a composite without them goes live first, then shared shards retrain, everything derived
    from their data is purged, every store is scanned, and a certificate is appended to the ledger."""
    ctx = load_served(workspace)
    # A run without the owner's proof only resumes a request `cdm revoke` began on the workspace (an operator's):
    # nobody who merely reaches the Prefect API can start an operator revocation.
    proof = {"signature": signature, "issued_at": issued_at,
             "received": received.timestamp() if received is not None else None} if signature else None
    rev = begin.begin(ctx, owner_key, proof, reason or None, via="event" if proof else "command",
                        create=proof is not None)
    with record.runner(ctx.ws, rev.request_id):  # one process at a time on a request
        plan = steps.plan(ctx, rev.request_id)
        live = steps.go_live(ctx, rev.request_id, plan)
        steps.remove_schedule(owner_key)
        if until == "go_live":
            return {"request_id": rev.request_id, "owner_key": owner_key, "live": live.model_dump(),
                    "completed": False}
        # From the needles file taken at `begin`, plus the token in memory (never written). Not needed once
        # verified.
        found = needles(ctx, rev, known_token.get()) if record.load(ctx.ws, rev.request_id).verify is None else None
        retrained = steps.retrain(ctx, rev.request_id, plan, live, progress)
        steps.forgetting_check(ctx, rev.request_id, plan, retrained)
        purged = steps.purge(ctx, rev.request_id, plan, live, retrained)
        verification = steps.verify(ctx, rev.request_id, purged, found)
        evaluation = steps.reevaluate(ctx, rev.request_id, retrained)
        cert = steps.certify(ctx, rev.request_id, verification, evaluation)
    from prefect.artifacts import create_markdown_artifact

    from cdm.platform.workspace.reports import certificate_markdown

    create_markdown_artifact(certificate_markdown(cert), key="cdm-revocation",
                             description=f"erasure certificate {cert['request_id']} (owner key {owner_key})")
    return {**cert, "completed": True}
