"""Unlearning flow, owner-triggered: `cdm revoke OWNER`, or the `cdm.owner.revoked` event under `cdm serve`.

The steps run in order (see cdm/unlearn.py); each is a task whose result is recorded before the next, so
rerunning the flow after a crash finishes the job.
"""

from __future__ import annotations

import hashlib
import hmac

from prefect import flow

from cdm import unlearn
from cdm.workspace import Workspace, WorkspaceError
from tasks.unlearn import run_steps


def authorize(ws: Workspace, owner: str, token: str | None) -> str:
    """`owner` when a token proves the request comes from that owner; `operator` when no token is given."""
    if token is None:
        return "operator"
    record = ws.owner_records().get(ws.owner_key(owner), {})
    expected = record.get("token_sha256")
    if not expected or not hmac.compare_digest(expected, hashlib.sha256(token.encode()).hexdigest()):
        raise PermissionError(f"the token does not belong to owner {owner!r}")
    return "owner"


@flow(name="cdm-unlearn", flow_run_name="unlearn")
def unlearn_owner(workspace: str, owner: str, reason: str | None = None, token: str | None = None) -> dict:
    """Revoke `owner`: new composite live first, then retrain shared shards, purge, verify, certify."""
    ws = Workspace(workspace).require()
    requested_by = authorize(ws, owner, token)
    state = unlearn.begin(ws, owner, reason, requested_by)
    for steps in unlearn.TASKS:
        state = run_steps(workspace, state["owner_key"], steps)
    if not state.get("completed"):
        raise WorkspaceError("unlearning did not complete")
    return state["certificate"]
