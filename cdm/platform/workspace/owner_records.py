"""Owner records (`.cdm/owners.json`): the one documented place that keeps a raw owner id (docs/design.md §5).

    {owner_key: {"owner": raw id, "state": pending|active|revoked, "source": absolute path or s3:// URL,
                 "cron": ..., "license": ..., "token_public_key": ..., "consents": [times], ...}}

Everything else names owners by key. After a revocation the record keeps the raw id, `state: revoked`, the request
id and the times; source, schedule, license and token key are dropped. A revoked owner stays revoked until
`cdm consent` records a new consent and issues a new token.

The owner's proof (docs/design.md §5): the token seeds an Ed25519 key; the record keeps only its public key, which
checks a signed request and cannot make one. A revocation request is signed over what it asks (owner key, reason,
time), so a copy of `owners.json`, a backup or a replayed old event proves nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from typing import Literal

from filelock import FileLock
from pydantic import BaseModel

from cdm.platform.workspace.errors import OwnerRevoked, WorkspaceError
from cdm.platform.workspace.fileio import atomic_write
from cdm.platform.workspace.paths import Workspace, check_owner_id, now

State = Literal["pending", "active", "revoked"]


class OwnerRecord(BaseModel):
    owner: str  # the raw id
    state: State = "pending"  # pending: an ingestion was requested and has not committed yet
    source: str | None = None  # absolute folder path or s3:// URL, for the scheduled ingestion
    cron: str | None = None
    license: str | None = None
    token_public_key: str | None = None  # Ed25519 public key (hex) of the owner's token: checks, cannot sign
    token_sha256: str | None = None  # records made before signed requests: checked only where the token is shown
    consents: list[str] = []
    revocation: str | None = None  # request id of the revocation in progress or done
    revoked: str | None = None
    updated: str | None = None


def _path(ws: Workspace):
    return ws.state_dir / "owners.json"


def records(ws: Workspace) -> dict[str, OwnerRecord]:
    path = _path(ws)
    raw = json.loads(path.read_text()) if path.exists() else {}
    return {k: OwnerRecord.model_validate(v) for k, v in raw.items()}


def record(ws: Workspace, key: str) -> OwnerRecord | None:
    return records(ws).get(key)


def record_of(ws: Workspace, owner: str) -> tuple[str, OwnerRecord | None]:
    key = ws.owner_key(owner)
    return key, record(ws, key)


def update(ws: Workspace, key: str, drop: tuple[str, ...] = (), **fields) -> OwnerRecord:
    """Read-modify-write of one record, serialized across processes by its own lock (callers may hold the
    workspace lock). `drop` resets fields to their defaults."""
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(ws.state_dir / "owners.lock"):
        all_records = records(ws)
        current = all_records.get(key)
        if current is None and "owner" not in fields:
            raise WorkspaceError(f"no owner record for {key}")
        data = {**(current.model_dump() if current else {}), **fields}
        for name in drop:
            data[name] = OwnerRecord.model_fields[name].default
        all_records[key] = OwnerRecord.model_validate({**data, "updated": now()})
        _write(ws, all_records)
        return all_records[key]


def remove(ws: Workspace, key: str) -> None:
    """Forget a record that never became active (its first ingestion was refused)."""
    with FileLock(ws.state_dir / "owners.lock"):
        all_records = records(ws)
        if key in all_records and all_records[key].state == "pending":
            del all_records[key]
            _write(ws, all_records)


def _write(ws: Workspace, all_records: dict[str, OwnerRecord]) -> None:
    atomic_write(_path(ws), json.dumps({k: v.model_dump() for k, v in all_records.items()}, indent=2, sort_keys=True))


class RedactOwnerIds:
    """A logging filter: every raw owner id the records know (and every id refused at the door, `also`) becomes
    its key in log records, so no log file carries a raw id (docs/design.md §5). Tracebacks are formatted and
    redacted too. Longer ids first, so `carolyn` is not half-replaced as `carol`."""

    def __init__(self, ws: Workspace, also: tuple[str, ...] = ()):
        self.ws, self.also, self._stamp, self._pattern, self._keys = ws, also, None, None, {}

    def _refresh(self) -> None:
        path = _path(self.ws)
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if stamp == self._stamp and self._pattern is not None:
            return
        import re

        self._stamp = stamp
        try:
            ids = {r.owner: k for k, r in records(self.ws).items()}
            for o in self.also:
                try:
                    ids.setdefault(o, self.ws.owner_key(o))
                except WorkspaceError:  # not a valid id: not a key either
                    ids.setdefault(o, "<owner id>")
        except (OSError, ValueError):
            ids = {}
        self._keys = ids
        self._pattern = re.compile("|".join(re.escape(o) for o in sorted(ids, key=len, reverse=True))) if ids else None

    def redact(self, text: str) -> str:
        self._refresh()
        return text if self._pattern is None else self._pattern.sub(lambda m: self._keys[m.group()], text)

    def filter(self, record) -> bool:
        import logging

        record.msg, record.args = self.redact(record.getMessage()), None
        if record.exc_info:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def require_consent(rec: OwnerRecord | None, key: str) -> None:
    """Refuse anything that would bring back the data of an owner who revoked consent."""
    if rec is not None and rec.state == "revoked":
        raise OwnerRevoked(f"owner {key} revoked consent ({rec.revocation}); nothing is ingested until "
                           "`cdm consent OWNER` records a new consent")


PROOF_MAX_AGE_SECONDS = 600  # a signed request older (or further ahead) than this is refused: a copied event
                             # cannot be replayed later


def _signing_key(token: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"cdm owner token\0" + token.encode()).digest())


def public_key(token: str) -> str:
    """The public half (hex) of the key the token seeds: what the owner record keeps."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return _signing_key(token).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def issue_token(ws: Workspace, key: str) -> str:
    """A new owner token (returned once); only the public key it seeds is stored."""
    token = secrets.token_urlsafe(32)
    update(ws, key, token_public_key=public_key(token), drop=("token_sha256",))
    return token


def token_matches(rec: OwnerRecord | None, token: str) -> bool:
    """Whether `token` (in clear) is the one issued to this owner (constant-time)."""
    if rec is None:
        return False
    if rec.token_public_key:
        return hmac.compare_digest(rec.token_public_key, public_key(token))
    return bool(rec.token_sha256) and hmac.compare_digest(rec.token_sha256,
                                                          hashlib.sha256(token.encode()).hexdigest())


def revocation_message(owner_key: str, reason: str | None, issued_at: float) -> bytes:
    """The bytes an owner signs to revoke: what is asked, by whom, when (canonical JSON)."""
    return json.dumps({"action": "cdm.owner.revoke", "owner_key": owner_key, "reason": reason or None,
                       "issued_at": round(float(issued_at), 3)}, sort_keys=True, separators=(",", ":")).encode()


def sign_revocation(token: str, owner_key: str, reason: str | None = None, issued_at: float | None = None) -> dict:
    """The payload of a `cdm.owner.revoked` event (or a command's proof): {owner_key, reason, issued_at, signature}.
    Only the token's holder can make it."""
    issued_at = round(time.time() if issued_at is None else float(issued_at), 3)
    signature = _signing_key(token).sign(revocation_message(owner_key, reason, issued_at)).hex()
    return {"owner_key": owner_key, "reason": reason or None, "issued_at": issued_at, "signature": signature}


def check_revocation(rec: OwnerRecord | None, owner_key: str, reason: str | None, issued_at, signature,
                     now: float | None = None) -> None:
    """Accept a signed revocation request of `owner_key`, or raise PermissionError with the reason: no key on
    record (an older record: revoke with the token through `cdm revoke --token-stdin`), a signature the owner's key
    does not verify (another token, a changed reason or time, a forged or copied value), or a request signed more
    than PROOF_MAX_AGE_SECONDS before `now` (when the request was received: an event's server-side receipt time, so
    a run that waited in a queue is judged by when the event arrived; default: this moment)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if rec is None or not rec.token_public_key:
        raise PermissionError(f"owner {owner_key} has no token key on record; their request cannot be checked")
    try:
        issued, sig = float(issued_at), bytes.fromhex(str(signature))
    except (TypeError, ValueError):
        raise PermissionError(f"the request of {owner_key} carries no valid signature and time") from None
    if not math.isfinite(issued) or not abs((time.time() if now is None else now) - issued) <= PROOF_MAX_AGE_SECONDS:
        raise PermissionError(f"the signed request of {owner_key} is older than {PROOF_MAX_AGE_SECONDS} s (or "
                              "dated ahead): sign a new one")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(rec.token_public_key)).verify(
            sig, revocation_message(owner_key, reason, issued))
    except (InvalidSignature, ValueError):
        raise PermissionError(f"the request's signature is not that of owner {owner_key}'s token") from None


def authorize(ws: Workspace, owner: str, token: str | None) -> str:
    """`owner` when the token proves the request comes from that owner, `operator` when no token is given."""
    if token is None:
        return "operator"
    if not token_matches(record(ws, ws.owner_key(check_owner_id(owner))), token):
        raise PermissionError(f"the token does not belong to owner {owner!r}")
    return "owner"
