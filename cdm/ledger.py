"""Append-only, hash-chained audit ledger (JSON lines).

Each entry stores `prev` (the previous entry's hash) and `hash = sha256(prev + canonical JSON of the body)`.
Editing, removing or reordering any entry breaks the chain from that point on, and `verify` says where.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

GENESIS = "0" * 64


def _digest(prev: str, body: dict) -> str:
    return hashlib.sha256((prev + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()).hexdigest()


def read(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append(path: str | Path, body: dict) -> dict:
    """Append one entry (fsync'd). Returns the stored entry with `seq`, `prev` and `hash`."""
    path = Path(path)
    entries = read(path)
    prev = entries[-1]["hash"] if entries else GENESIS
    body = {**body, "seq": len(entries)}
    entry = {**body, "prev": prev, "hash": _digest(prev, body)}
    with path.open("a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


@dataclass
class Verification:
    ok: bool
    entries: int
    problem: str | None = None

    def as_dict(self) -> dict:
        return {"ok": self.ok, "entries": self.entries, "problem": self.problem}


def verify(path: str | Path) -> Verification:
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
        if _digest(prev, body) != entry.get("hash"):
            return Verification(False, len(entries), f"entry {i}: content edited (hash mismatch)")
        prev = entry["hash"]
    return Verification(True, len(entries))
