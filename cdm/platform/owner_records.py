"""Owner records (`.cdm/owners.json`): the one documented place that keeps a raw owner id (docs/design.md §5).

    {owner_key: {"owner": raw id, "state": pending|active|revoked, "source": absolute path or s3:// URL,
                 "cron": ..., "license": ..., "token_sha256": ..., "consents": [times], ...}}

Everything else names owners by key. After a revocation the record keeps the raw id, `state: revoked`, the request
id and the times; source, schedule, license and token hash are dropped. A revoked owner stays revoked until
`cdm consent` records a new consent and issues a new token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Literal

from filelock import FileLock
from pydantic import BaseModel

from cdm.platform.errors import OwnerRevoked, WorkspaceError
from cdm.platform.fileio import atomic_write
from cdm.platform.workspace import Workspace, check_owner_id, now

State = Literal["pending", "active", "revoked"]


class OwnerRecord(BaseModel):
    owner: str  # the raw id
    state: State = "pending"  # pending: an ingestion was requested and has not committed yet
    source: str | None = None  # absolute folder path or s3:// URL, for the scheduled ingestion
    cron: str | None = None
    license: str | None = None
    token_sha256: str | None = None
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


def issue_token(ws: Workspace, key: str) -> str:
    """A new owner token (returned once); only its sha256 is stored."""
    token = secrets.token_urlsafe(24)
    update(ws, key, token_sha256=hashlib.sha256(token.encode()).hexdigest())
    return token


def token_matches(rec: OwnerRecord | None, token_sha256: str) -> bool:
    """Whether a token's sha256 is the one issued to this owner (constant-time)."""
    return bool(rec and rec.token_sha256) and hmac.compare_digest(rec.token_sha256, token_sha256)


def authorize(ws: Workspace, owner: str, token: str | None) -> str:
    """`owner` when the token proves the request comes from that owner, `operator` when no token is given."""
    if token is None:
        return "operator"
    if not token_matches(record(ws, ws.owner_key(check_owner_id(owner))), hashlib.sha256(token.encode()).hexdigest()):
        raise PermissionError(f"the token does not belong to owner {owner!r}")
    return "owner"
