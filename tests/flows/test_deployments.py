"""Emitting `cdm.owner.revoked` creates a run of the unlearning deployment (Prefect test harness, real API)."""

from __future__ import annotations

import asyncio
import time

import pytest

from cdm.platform.create import init_workspace
from cdm.platform.workspace.owner_records import sign_revocation
from flows.deployments import REVOKED_EVENT, deployments

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_revocation_event_creates_an_unlearning_flow_run(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events import emit_event

    ws = init_workspace(tmp_path / "ws")
    (deployment,) = [d for d in deployments(str(ws.root)) if d.name == "on-revocation"]
    deployment_id = deployment.apply()

    async def runs():
        async with get_client() as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))

    assert asyncio.run(runs()) == []
    time.sleep(2)  # let the trigger's automation load
    payload = sign_revocation("a-token", "ok-0123456789abcdef", "consent withdrawn")
    emit_event(REVOKED_EVENT, resource={"prefect.resource.id": "cdm.owner.ok-0123456789abcdef"}, payload=payload)
    deadline, found = time.time() + 60, []
    while time.time() < deadline and not found:
        time.sleep(1)
        found = asyncio.run(runs())
    assert found, "no flow run was created for the revocation event"
    params = found[0].parameters
    assert params["owner_key"] == "ok-0123456789abcdef" and params["signature"] == payload["signature"]
    assert float(params["issued_at"]) == payload["issued_at"] and params["reason"] == "consent withdrawn"
    assert params["received"]  # the server's receipt time, which the proof's age is measured against
    assert found[0].name != "" and "owner" not in params and "token" not in params
