"""Step `certify`: the erasure certificate, its hash in the keyed ledger, the ledger's anchor in the registry, the
certificate as an MLflow audit run; then `complete` writes the certificate and `completed` in one write and deletes
the needles. Only after a verification that found nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from cdm.platform.forgetting.record import Revocation, fault_point, needles_path, save
from cdm.platform.forgetting.verification import VerificationFailed
from cdm.platform.models import registry
from cdm.platform.workspace import ledger, owner_records
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.paths import now


def shared_base(ctx: Context) -> dict | None:
    """The shared initialization as it stands after the purge (None without one): trained on public data only, it
    holds no owner's data, so a revocation deletes compartments (full shards or LoRA adapters) and never it."""
    from cdm.platform.models.weights import UNET_ARTIFACT, WEIGHTS_FILE, sha256_file

    mv = registry.alias_version(ctx.client, registry.INIT, registry.CURRENT)
    if mv is None:
        return None
    with registry.model_files(ctx.client, registry.INIT, str(mv.version), ctx.ws.tmp_dir) as files:
        # A text workspace's base: a StableDiffusionPipeline folder (logged under its own folder's name).
        pipeline = next((d for d in files.iterdir() if (d / "model_index.json").is_file()), None)
        if pipeline is not None:
            from cdm.text.base import base_sha256

            weights = base_sha256(pipeline)
        else:
            weights = sha256_file(files / UNET_ARTIFACT / WEIGHTS_FILE)  # as stored now, not as the tag says
    return {"model": registry.INIT, "version": str(mv.version), "weights_sha256": weights,
            "public_manifest_sha256": mv.tags.get("cdm.public_manifest_sha256"),
            "trained_on": mv.tags.get("cdm.trained_on"),  # a brought base: its owners' statement
            "touched": weights != mv.tags.get("cdm.weights_sha256")}


def certificate(rev: Revocation, base: dict | None = None, text: bool = False) -> dict:
    """The erasure certificate: what was received, what was deleted and retrained, and the verification. `text`:
    a text workspace (its composites carry a prompt prior)."""
    registered = {v for v in (rev.go_live.composite_live if rev.go_live else None,
                              rev.retrain.composite_after if rev.retrain else None) if v is not None}
    return {
        "type": "cdm.erasure-certificate",
        "request_id": rev.request_id, "owner_key": rev.owner_key, "reason": rev.reason,
        "requested_by": rev.requested_by, "received": rev.received,
        "seconds_to_live": round(rev.go_live.seconds_to_live, 3) if rev.go_live else None,
        "seconds_to_complete": round(time.time() - rev.received_ts, 3),
        "completed": now(),
        "shards_dropped": rev.plan.exclusive_shards, "shards_retrained": rev.plan.shared_shards,
        "retraining": rev.retrain.shards if rev.retrain else {},
        "router_retrained": bool(rev.retrain and rev.retrain.router_retrained),
        # A text composite's prompt prior is fitted again, without the owner's captions, by every composite the
        # revocation registers (going live and after retraining).
        "prompt_prior_retrained": None if not text else bool(registered - {rev.plan.composite_before}),
        "composite_before": rev.plan.composite_before, "composite_live": rev.go_live.composite_live,
        "composite_after": rev.retrain.composite_after if rev.retrain else None,
        "purged": rev.purge.model_dump() if rev.purge else None,
        "verification": rev.verify.model_dump() if rev.verify else None,
        "forgetting": rev.forgetting_check.model_dump() if rev.forgetting_check else None,
        "evaluation": rev.reevaluate,
        "shared_base": base,
    }


def certify(ctx: Context, rev: Revocation) -> dict:
    """Ledger entry (keyed, under the lock) with the certificate's hash; the certificate with the ledger anchor as
    an MLflow audit run; the anchor as a tag on the registered composite; the owner record marked revoked. Only
    after a verification that found nothing. Idempotent: a run that died after appending finds its entry (the
    certificate keeps the first run's times). The caller records the certificate and `completed` in one write,
    then deletes the needles."""
    if rev.verify is None or not rev.verify.ok:
        raise VerificationFailed(f"{rev.request_id}: no verification that found nothing; the request stays open",
                                 code=1)
    ws = ctx.ws
    if rev.certificate_draft is None:  # fixed before the ledger names its hash: a rerun certifies the same document
        rev.certificate_draft = certificate(rev, shared_base(ctx), ctx.params.data.conditioning == "text")
        save(ws, rev)
    cert = dict(rev.certificate_draft)
    previous = [e for e in ledger.read(ws.ledger_path) if e.get("request_id") == rev.request_id]
    if previous:
        entry = previous[-1]
    else:
        entry, _ = ledger.record(ws, {
            "event": "revocation", "request_id": cert["request_id"], "owner_key": cert["owner_key"],
            "requested_by": cert["requested_by"], "received": cert["received"], "completed": cert["completed"],
            "shards_dropped": cert["shards_dropped"], "shards_retrained": cert["shards_retrained"],
            "verification_ok": True,
            "certificate_sha256": hashlib.sha256(json.dumps(cert, sort_keys=True).encode()).hexdigest()})
    fault_point("certify:after-ledger")
    registry.anchor_ledger(ctx.client, ledger.head(ledger.read(ws.ledger_path)))
    cert["ledger"] = {"seq": entry["seq"], "hash": entry["hash"]}
    cert["audit_run"] = registry.log_certificate(ctx.client, ctx.artifact_root, cert)
    owner_records.update(ws, rev.owner_key, revoked=cert["completed"])
    return cert


def complete(ctx: Context, rev: Revocation, cert: dict) -> Revocation:
    """The certificate and `completed` in one write, then the needles file goes (a crash in between leaves a file
    that `sweep_needles` removes at the next command)."""
    rev.certify, rev.completed = cert, True
    save(ctx.ws, rev)
    fault_point("certify:after-complete")
    needles_path(ctx.ws, rev.request_id).unlink(missing_ok=True)
    return rev


def run(ctx: Context, rev: Revocation) -> dict:
    """The certificate, recorded with `completed` (a completed request's certificate is returned as recorded)."""
    if rev.completed:
        return rev.certify
    return complete(ctx, rev, certify(ctx, rev)).certify
