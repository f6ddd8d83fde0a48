"""Append-only audit ledger (JSON lines), chained and keyed (docs/design.md §5).

    entry = {**body, "seq": n, "prev": hash of entry n-1, "hash": HMAC-SHA256(secret, prev + canonical body)}

Keyed with the workspace secret, so someone who can write the file but does not hold the secret cannot rewrite it
consistently. The head (`seq:hash` of the last entry) is anchored outside the file — in each certificate and as the
tag `cdm.ledger_head` on the registered composite — so a truncated or replaced ledger is detected too. Appends run
under the workspace lock (the caller's), so concurrent revocations never fork the chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

GENESIS = "0" * 64


def _digest(secret: bytes, prev: str, body: dict) -> str:
    message = (prev + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def read(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def head(entries: list[dict]) -> str | None:
    """The anchor of a ledger: `seq:hash` of its last entry (None when empty)."""
    return f"{entries[-1]['seq']}:{entries[-1]['hash']}" if entries else None


def append(path: str | Path, secret: bytes, body: dict) -> dict:
    """Append one entry (fsync'd). The caller holds the workspace lock. Returns the stored entry."""
    path = Path(path)
    entries = read(path)
    prev = entries[-1]["hash"] if entries else GENESIS
    body = {**body, "seq": len(entries)}
    entry = {**body, "prev": prev, "hash": _digest(secret, prev, body)}
    with path.open("a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def record(ws, body: dict) -> tuple[dict, str]:
    """Append `body` to the workspace's ledger and commit it, under the workspace lock (concurrent revocations and
    consents never fork the chain). Returns (entry, new head) — the caller anchors the head."""
    from cdm.platform.workspace.gitrepo import commit

    with ws.lock():
        entry = append(ws.ledger_path, ws.secret(), body)
        commit(ws.root, f"ledger: {body.get('event', 'entry')} {body.get('request_id') or body.get('owner_key', '')}",
               "ledger.jsonl")
        return entry, head(read(ws.ledger_path))


@dataclass
class Verification:
    ok: bool
    entries: int
    problem: str | None = None
    head: str | None = None

    def as_dict(self) -> dict:
        return {"ok": self.ok, "entries": self.entries, "problem": self.problem, "head": self.head}


def verify(path: str | Path, secret: bytes, anchor: str | None = None, anchor_required: bool = False) -> Verification:
    """Check the chain, each entry's keyed hash, and (when given) that the anchored head is in the ledger. With
    `anchor_required`, a non-empty ledger without an anchor fails (a deleted anchor must not turn the check off)."""
    try:
        entries = read(path)
    except json.JSONDecodeError as e:
        return Verification(False, 0, f"line {e.lineno}: not valid JSON")
    prev = GENESIS
    for i, entry in enumerate(entries):
        body = {k: v for k, v in entry.items() if k not in ("prev", "hash")}
        if entry.get("prev") != prev:
            return Verification(False, len(entries), f"entry {i}: chain broken (prev does not match entry {i - 1})")
        if body.get("seq") != i:
            return Verification(False, len(entries), f"entry {i}: sequence number {body.get('seq')} out of order")
        if not hmac.compare_digest(_digest(secret, prev, body), str(entry.get("hash"))):
            return Verification(False, len(entries), f"entry {i}: content edited (keyed hash mismatch)")
        prev = entry["hash"]
    if anchor is None and anchor_required and entries:
        return Verification(False, len(entries), "the ledger has entries but its anchor (registry tag "
                                                 "cdm.ledger_head) is missing", head(entries))
    if anchor is not None:
        seq, _, anchored = anchor.partition(":")
        if not seq.isdigit() or int(seq) >= len(entries) or entries[int(seq)]["hash"] != anchored:
            return Verification(False, len(entries), f"the anchored head {anchor[:24]}… is not in the ledger "
                                                     "(entries removed or the ledger replaced)", head(entries))
    return Verification(True, len(entries), None, head(entries))
