"""Deployments: a cron-scheduled ingestion per owner, and the unlearning flow triggered by `cdm.owner.revoked`.

Cron schedules need a real Prefect server (the ephemeral API runs no scheduler) and triggered runs need a serving
process: `cdm serve` starts a server on loopback unless PREFECT_API_URL points at one, then serves both.

Emit a revocation (the owner signs it with the token issued at their first ingestion, and names themselves by the
owner key printed then; neither the raw id nor the token reaches Prefect; `cdm sign-revocation` prints the payload):

    from prefect.events import emit_event
    from cdm.platform.workspace.owner_records import sign_revocation
    emit_event("cdm.owner.revoked", resource={"prefect.resource.id": "cdm.owner.ok-…"},
               payload=sign_revocation(token, "ok-…", reason="consent withdrawn"))
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

REVOKED_EVENT = "cdm.owner.revoked"
DEFAULT_CRON = "0 3 * * *"  # daily at 03:00


def deployments(workspace: str) -> list:
    """A cron ingestion deployment per active owner with a recorded source, and the revocation deployment.
    Parameters carry owner keys only."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from cdm.platform.workspace import owner_records
    from cdm.platform.workspace.paths import Workspace
    from flows.ingestion import ingest_owner
    from tasks.ingest import ingestion_deployment
    from flows.unlearning import unlearn_owner

    ws = Workspace(workspace).require()
    out = []
    for key, rec in sorted(owner_records.records(ws).items()):
        if rec.state != "active" or not rec.source:
            continue
        out.append(ingest_owner.to_deployment(
            name=ingestion_deployment(key), cron=rec.cron or DEFAULT_CRON,
            parameters={"workspace": str(ws.root), "owner_key": key}, tags=["cdm", "ingestion"]))
    out.append(unlearn_owner.to_deployment(
        name="on-revocation", tags=["cdm", "unlearning"],
        triggers=[DeploymentEventTrigger(
            name="owner revoked", expect={REVOKED_EVENT},
            parameters={"workspace": str(ws.root), "owner_key": "{{ event.payload.owner_key }}",
                        "signature": "{{ event.payload.signature }}",
                        "issued_at": "{{ event.payload.issued_at }}",
                        "received": "{{ event.received.isoformat() }}",  # the server's receipt time: the proof's clock
                        "reason": "{{ event.payload.reason }}"})]))
    return out


def deploy_to_pool(workspace: str, stack) -> list[str]:
    """The same deployments on the stack's work pool: its worker runs them as subprocesses in this checkout
    (schedules by the stack's Prefect server, the revocation trigger by its automations). Returns their names."""
    from pathlib import Path

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from cdm.platform.stack.services import credentials
    from cdm.platform.workspace.paths import Workspace

    checkout = str(Path(__file__).resolve().parent.parent)  # where the entrypoints (flows/…) resolve
    auth = credentials(Workspace(workspace))["prefect_auth"]
    with temporary_settings({PREFECT_API_URL: stack.prefect_api_url, PREFECT_API_AUTH_STRING: auth}):
        names = []
        for d in deployments(workspace):
            d.job_variables = {**d.job_variables, "working_dir": checkout}
            d.apply(work_pool_name=stack.work_pool)
            names.append(d.name)
        return names


def start_local_server(auth: str, port: int = 4200, timeout: float = 180) -> subprocess.Popen:
    """`prefect server start` on loopback with `auth` as its API auth string (every request but /health must
    carry it: without it anyone on this machine could pause or delete `on-revocation`); returns the process
    once /api/health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "PREFECT_SERVER_API_AUTH_STRING": auth})
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"prefect server did not answer on {url} within {timeout} s")


def serve(workspace: str) -> None:
    from prefect import serve as prefect_serve

    from flows import SERVED_WORKSPACES

    os.environ[SERVED_WORKSPACES] = workspace  # flow runs started here refuse any other workspace
    from cdm.platform.stack.services import credentials
    from cdm.platform.workspace.paths import Workspace

    server = None
    if not os.environ.get("PREFECT_API_URL"):
        auth = credentials(Workspace(workspace))["prefect_auth"]  # generated, 0600
        server = start_local_server(auth)
        os.environ["PREFECT_API_URL"] = "http://127.0.0.1:4200/api"
        os.environ["PREFECT_API_AUTH_STRING"] = auth
        print("Prefect UI: http://127.0.0.1:4200", file=sys.stderr)
    try:
        prefect_serve(*deployments(workspace))
    finally:
        if server is not None:
            server.terminate()
