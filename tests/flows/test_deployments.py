"""Emitting `cdm.owner.revoked` creates a run of the unlearning deployment (Prefect test harness, real API)."""

from __future__ import annotations

import asyncio
import time

import pytest

from cdm.platform.workspace import init_workspace
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
    emit_event(REVOKED_EVENT, resource={"prefect.resource.id": "cdm.owner.alice"},
               payload={"owner": "alice", "token": "t0k3n", "reason": "consent withdrawn"})
    deadline, found = time.time() + 60, []
    while time.time() < deadline and not found:
        time.sleep(1)
        found = asyncio.run(runs())
    assert found, "no flow run was created for the revocation event"
    assert found[0].parameters["owner"] == "alice" and found[0].parameters["token"] == "t0k3n"
