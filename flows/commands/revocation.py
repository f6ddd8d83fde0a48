"""`cdm` commands, revocation: out of serving here, the rest in a background process (or `--wait`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cdm.platform.workspace.errors import CommandFailed, WorkspaceError
from flows.commands.common import _ctx, _status


def read_token(token: str | None, token_stdin: bool) -> str | None:
    """The owner's token: from stdin's first line (`--token-stdin`), the CDM_OWNER_TOKEN environment variable, or
    `--token` (visible to other users in `ps` for the whole command: the other two are preferred)."""
    if token_stdin:
        token = sys.stdin.readline().strip()
        if not token:
            raise WorkspaceError("--token-stdin: no token on standard input")
    return token or os.environ.get("CDM_OWNER_TOKEN") or None


def revoke(workspace: str, owner: str, reason: str | None, token: str | None, wait: bool, progress: bool,
           token_stdin: bool = False):
    """Checked and begun here (the token stays in this process), out of serving in this process, the rest in a
    background process unless `wait` (it gets the token through a pipe, to search the stores for it)."""
    from cdm.platform.workspace import owner_records
    from cdm.platform.forgetting import begin, go_live, plan, record
    from cdm.platform.forgetting.record import load, sweep_needles
    from cdm.platform.workspace.paths import check_owner_id

    token = read_token(token, token_stdin)
    ctx = _ctx(workspace)
    sweep_needles(ctx.ws)  # a crash right after an earlier completion may have left one
    key, rec = owner_records.record_of(ctx.ws, check_owner_id(owner))
    if rec is None or (rec.state != "revoked" and owner not in ctx.ws.owners()):
        raise WorkspaceError(f"unknown owner {owner!r}")
    if rec.state == "revoked" and rec.revocation and load(ctx.ws, rec.revocation).completed:
        raise WorkspaceError(f"owner {owner!r} was already revoked (request {rec.revocation})")
    # The token is checked here and signs the request; begin() checks the signature against the owner's key
    # (PermissionError, exit 2) before anything changes. The token itself never leaves this process.
    proof = None
    if token and rec.state != "revoked":
        if not owner_records.token_matches(rec, token):
            raise PermissionError(f"the token does not belong to owner {owner!r}")
        if not rec.token_public_key:  # a record made before signed requests: the token shown here upgrades it
            owner_records.update(ctx.ws, key, token_public_key=owner_records.public_key(token), drop=("token_sha256",))
        proof = owner_records.sign_revocation(token, key, reason)
    rev = begin.begin(ctx, key, proof, reason)
    if wait:
        from flows.unlearning import known_token, unlearn_owner

        marker = known_token.set(token)
        try:
            with _status(f"revoking {owner}: live without them, retrain, purge, scan, certify", progress):
                cert = unlearn_owner(str(ctx.ws.root), key, progress=progress)
        finally:
            known_token.reset(marker)
        return _revoked(owner, cert)
    # Out of serving without waiting for a Prefect API to start: the two steps run here, under the request's
    # runner lock, and are recorded; the background flow run finds them done and removes the schedule first.
    with record.runner(ctx.ws, rev.request_id):
        rev = load(ctx.ws, rev.request_id)
        live_step = go_live.run(ctx, rev, plan.run(ctx, rev))
    live = {"request_id": rev.request_id, "owner_key": key, "live": live_step.model_dump(), "completed": False}
    log = ctx.ws.logs_dir / f"{rev.request_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "finish-revocation", key, "--workspace",
                                 str(ctx.ws.root)] + (["--token-stdin"] if token else []),
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=str(ctx.ws.root),
                                env={k: v for k, v in os.environ.items() if k != "CDM_OWNER_TOKEN"})
        proc.stdin.write((token or "") + "\n")
        proc.stdin.close()
    version = live["live"]["composite_live"]
    serving = f"production is cdm-composite v{version} without their shards" if version else "nothing is served"
    result = {**live, "background": {"pid": proc.pid, "log": str(log)}}
    return result, (f"{owner} is out of serving ({rev.request_id}): {serving}, live in "
                    f"{live['live']['seconds_to_live']:.1f} s; ingestion of them is refused from now on.\n"
                    f"The purge continues in the background (pid {proc.pid}, log {log}); `cdm status` shows its "
                    f"progress (`--wait` waits for it).")


def _revoked(owner: str, cert: dict):
    v = cert.get("verification") or {}
    text = (f"revoked {owner} ({cert['request_id']}): live in {cert['seconds_to_live']} s, complete in "
            f"{cert['seconds_to_complete']} s; dropped {cert['shards_dropped']}, retrained "
            f"{cert['shards_retrained']}; verification {'ok' if v.get('ok') else 'FAILED'} "
            f"({sum(v.get('scan', {}).get('scanned', {}).values())} items in "
            f"{len(v.get('scan', {}).get('scanned', {}))} stores scanned)")
    if not v.get("ok"):
        raise CommandFailed("verification found traces of the owner: " + json.dumps(
            v.get("scan", {}).get("findings", [])[:3]), code=1, result=cert, text=text)
    return cert, text


def finish_revocation(workspace: str, owner_key: str, token_stdin: bool):
    from flows.unlearning import known_token, unlearn_owner

    ctx = _ctx(workspace)
    token = sys.stdin.readline().strip() if token_stdin else None
    marker = known_token.set(token or None)
    # A process started by `cdm revoke` whose runner lock is held elsewhere exits 2 with the reason (RevocationRunning).
    try:
        cert = unlearn_owner(str(ctx.ws.root), owner_key)
    finally:
        known_token.reset(marker)
    return _revoked(owner_key, cert)


def sign_revocation(owner_key: str, reason: str | None, token: str | None, token_stdin: bool):
    """The payload of a `cdm.owner.revoked` event, signed with the owner's token (no workspace needed: an owner runs
    this on their own machine and sends the event, or hands the payload to whoever sends it)."""
    from cdm.platform.workspace.owner_records import sign_revocation as sign

    token = read_token(token, token_stdin)
    if not token:
        raise WorkspaceError("no token: pass it on stdin (--token-stdin) or in CDM_OWNER_TOKEN")
    if not owner_key.startswith("ok-"):
        raise WorkspaceError(f"{owner_key!r} is not an owner key (ok-…, printed at the owner's first ingestion)")
    payload = sign(token, owner_key, reason)
    return payload, json.dumps(payload)
