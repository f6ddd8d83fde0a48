"""`cdm` commands, the workspace as a whole: status, the demo, serving deployments, the UIs."""

from __future__ import annotations

import contextlib
import subprocess
import sys

from cdm.platform.workspace.errors import CommandFailed
from flows.commands.common import _ctx


def status(workspace: str):
    from cdm.platform.workspace import ledger, owner_records
    from cdm.platform.models import registry
    from cdm.platform.models.composites import production
    from cdm.platform.models.gate import active_owners
    from cdm.platform.forgetting.record import all_revocations, sweep_needles
    from cdm.platform.models.shards import load_plan

    ctx = _ctx(workspace)
    ws, c = ctx.ws, ctx.client
    sweep_needles(ws)
    owners = [{"id": o, "samples": len(ws.manifest(o)["samples"]), "state": "active",
               "license": ws.manifest(o).get("license")} for o in active_owners(ws)]
    active = {ws.owner_key(o["id"]) for o in owners}
    owners += [{"id": key, "samples": 0, "state": rec.state} for key, rec in sorted(owner_records.records(ws).items())
               if key not in active and rec.state != "pending"]
    shards = [{"id": sid, "owners": members,
               "model_version": (mv.version if (mv := registry.latest(c, registry.SHARD_PREFIX + sid)) else None)}
              for sid, members in sorted(load_plan(ws).items())]
    prod = production(ctx)
    composite = None if prod is None else {"version": prod[0], "shards": [s["id"] for s in prod[1]["shards"]],
                                           "estimator": prod[1]["estimator"]}
    in_progress = [{"request_id": r.request_id, "owner_key": r.owner_key, "done": r.steps_done, "next": r.next_step}
                   for r in all_revocations(ws) if not r.completed]
    check = ledger.verify(ws.ledger_path, ws.secret(), registry.ledger_anchor(c), anchor_required=True)
    result = {"workspace": str(ws.root), "owners": owners, "shards": shards, "production": composite,
              "revocations_in_progress": in_progress, "ledger": check.as_dict()}
    lines = [f"workspace {ws.root}", "owners:"] + [f"  {o['id']:<24} {o['state']:<8} {o['samples']} samples"
                                                   for o in owners]
    lines += ["shards:"] + [f"  {s['id']:<14} v{s['model_version']}  {', '.join(s['owners'])}" for s in shards]
    lines += ["production: " + (f"cdm-composite v{composite['version']} ({composite['estimator']}, "
                                 f"{len(composite['shards'])} shards)" if composite else "none")]
    lines += [f"revocation in progress: {r['request_id']} ({r['owner_key']}): done {', '.join(r['done'])}; "
              f"next {r['next']}" for r in in_progress]
    lines += [f"ledger: {check.entries} entries, " + ("chain verified, anchor matches" if check.ok
                                                      else f"TAMPERED: {check.problem}")]
    if not check.ok:
        raise CommandFailed(f"audit ledger verification failed: {check.problem}", code=1, result=result,
                            text="\n".join(lines))
    return result, "\n".join(lines)


def demo(out: str, quick: bool, owners: int, partition: str, progress: bool, base: bool = True):
    from flows.demo import demo as run_demo

    result = run_demo(out, quick=quick, owners=owners, partition=partition, progress=progress, base=base)
    return result, result["report"]


def demo_text(out: str, owners: int, progress: bool):
    from flows.demo_text import demo_text as run_demo_text

    result = run_demo_text(out, owners=owners, progress=progress)
    return result, result["report"]


def serve(workspace: str):
    from flows.deployments import serve as run_serve

    run_serve(str(_ctx(workspace).ws.root))
    return None, ""


def ui(workspace: str, port: int, print_only: bool):
    """The MLflow UI on this workspace's store, behind MLflow's basic-auth app: anyone on this machine could
    otherwise move `production` or delete a `cdm.revoked` tag through it. The user is the workspace's generated
    admin; the password stays in `.cdm/stack/credentials.json` (0600), never on a command line or in output."""
    import os

    from cdm.platform.stack.services import credentials, mlflow_server_env

    ctx = _ctx(workspace)
    if ctx.stack:  # the stack's tracking server is the UI, authenticated already
        text = f"MLflow UI: {ctx.stack.mlflow_tracking_uri} (the stack's; user {credentials(ctx.ws)['mlflow_user']})"
        return {"mlflow_url": ctx.stack.mlflow_tracking_uri}, text
    folder = ctx.ws.state_dir / "ui"
    mlflow_cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                  "--port", str(port), "--backend-store-uri", ctx.tracking_uri, "--workers", "1"]
    user = credentials(ctx.ws)["mlflow_user"]
    prefect = f"PREFECT_HOME={ctx.ws.prefect_home} {sys.executable} -m prefect server start"
    text = (f"MLflow UI:  http://127.0.0.1:{port}  (user {user}; password: mlflow_password in "
            f"{ctx.ws.state_dir / 'stack' / 'credentials.json'})\n"
            f"Prefect UI: {prefect}   (http://127.0.0.1:4200)")
    result = {"mlflow": mlflow_cmd, "mlflow_url": f"http://127.0.0.1:{port}", "user": user, "prefect": prefect}
    if print_only:
        return result, text
    print(text, file=sys.stderr)
    _run_until_stopped(mlflow_cmd, {**os.environ, **mlflow_server_env(ctx.ws, folder),
                                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    return result, ""


def _run_until_stopped(cmd: list[str], env: dict[str, str]) -> None:
    """Run a server in its own process group until it exits, Ctrl-C or SIGTERM; then stop the whole group (MLflow's
    server runs its app in a child process that would otherwise outlive us, still listening)."""
    import os
    import signal

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
