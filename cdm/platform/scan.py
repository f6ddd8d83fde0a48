"""The trace scan: look through every store cdm writes for what a revoked owner left behind (docs/design.md §5).

    needles (raw id, token hash, sample hashes, sample bytes)  x  stores (folders, git objects, S3 prefixes)
      -> ScanReport {store: items scanned} + findings [(store, where, what)]

A store is anything that yields `(where, bytes)` items. Matching rules:
- the raw id as a whole word (not inside a longer id such as `alice2`), in every item except files whose format is
  compressed or numeric (PNG, safetensors): a three-letter id would otherwise match random weight bytes; in a
  database file (SQLite and its WAL) column values sit next to each other with nothing between them, so there
  the id only needs a boundary on its left;
- hex strings (token sha256, sample sha256s, DVC md5s) and raw sample bytes (file contents and decoded pixels)
  as plain substrings, everywhere;
- item names (paths, object keys) are searched for the raw id and the hex strings too.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Formats whose bytes are compressed or numeric: searched for sample bytes and hex strings, not for the raw id.
BINARY_SUFFIXES = (".png", ".safetensors", ".pt", ".npy", ".jpg")
MAX_ITEM_BYTES = 256 << 20  # larger files are reported as unscanned, never silently skipped


@dataclass
class Needles:
    """What must not remain. `raw_id` may be None (e.g. a scan for hashes only)."""

    raw_id: str | None
    hex_strings: dict[str, str] = field(default_factory=dict)  # value -> what it is ("token sha256", ...)
    blobs: dict[bytes, str] = field(default_factory=dict)  # exact bytes (a sample file, its pixels) -> what

    def __post_init__(self):
        left = rb"(?<![A-Za-z0-9_-])" + re.escape(self.raw_id.encode()) if self.raw_id else None
        self._word = None if left is None else re.compile(left + rb"(?![A-Za-z0-9_-])")
        self._left = None if left is None else re.compile(left)

    def find(self, data: bytes, binary: bool, raw_id: bool = True, database: bool = False) -> list[str]:
        found = []
        pattern = self._left if database else self._word
        if raw_id and pattern is not None and not binary and pattern.search(data):
            found.append("raw owner id")
        found += sorted({what for value, what in self.hex_strings.items() if value.encode() in data})
        found += sorted({what for blob, what in self.blobs.items() if blob in data})
        return found

    def find_in_name(self, name: str, raw_id: bool = True) -> list[str]:
        found = []
        if raw_id and self._word is not None and self._word.search(name.encode()):
            found.append("raw owner id in name")
        found += sorted({f"{what} in name" for value, what in self.hex_strings.items() if value in name})
        return found


@dataclass
class Finding:
    store: str
    where: str
    what: str

    def as_dict(self) -> dict:
        return {"store": self.store, "where": self.where, "what": self.what}


@dataclass
class ScanReport:
    scanned: dict[str, int] = field(default_factory=dict)  # store -> items read
    findings: list[Finding] = field(default_factory=list)
    unscanned: list[str] = field(default_factory=list)  # items too large to read, with their store

    @property
    def ok(self) -> bool:
        return not self.findings and not self.unscanned

    def as_dict(self) -> dict:
        return {"ok": self.ok, "scanned": dict(self.scanned), "unscanned": list(self.unscanned),
                "findings": [f.as_dict() for f in self.findings]}


class Store:
    """A named source of `(where, bytes)` items."""

    name: str
    allow_raw_id: bool = False  # the owner record: the one documented place for a revoked owner's raw id
    database: bool = False  # database pages or dumps: columns abut, so the raw id needs a left boundary only

    def items(self) -> Iterator[tuple[str, bytes | None]]:  # None: too large to read
        raise NotImplementedError


@dataclass
class FolderStore(Store):
    name: str
    root: Path
    skip: tuple[Path, ...] = ()  # files or folders not scanned by this store (scanned by another, or documented)
    database: bool = False

    def items(self) -> Iterator[tuple[str, bytes | None]]:
        if not self.root.exists():
            return
        skip = tuple(p.resolve() for p in self.skip)
        for path in sorted(self.root.rglob("*")):
            if not path.is_file() or path.is_symlink() or any(path.resolve().is_relative_to(s) for s in skip):
                continue
            rel = path.relative_to(self.root).as_posix()
            yield rel, (path.read_bytes() if path.stat().st_size <= MAX_ITEM_BYTES else None)


@dataclass
class GitStore(Store):
    """Every object in a git repository (all commits, trees and blobs ever written, reachable or not)."""

    name: str
    root: Path

    def items(self) -> Iterator[tuple[str, bytes | None]]:
        if not (self.root / ".git").exists():
            return
        proc = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=self.root,
                              capture_output=True, check=True)
        out, pos = proc.stdout, 0
        while pos < len(out):
            header_end = out.index(b"\n", pos)
            sha, _kind, size = out[pos:header_end].decode().split()
            start = header_end + 1
            yield f"git object {sha}", out[start:start + int(size)]
            pos = start + int(size) + 1


@dataclass
class S3Store(Store):
    name: str
    client: object  # a boto3 S3 client
    bucket: str
    prefix: str

    def items(self) -> Iterator[tuple[str, bytes | None]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                data = None if obj["Size"] > MAX_ITEM_BYTES else \
                    self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                yield f"s3://{self.bucket}/{key}", data


@dataclass
class CommandStore(Store):
    """One item: what a command prints (e.g. `pg_dump` of a database: every live row, decompressed)."""

    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    database: bool = True

    def items(self) -> Iterator[tuple[str, bytes | None]]:
        import os

        proc = subprocess.run(self.args, capture_output=True, env={**os.environ, **self.env})
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name}: {Path(self.args[0]).name} failed: "
                               f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
        yield " ".join(Path(a).name if a.startswith("/") else a for a in self.args[:1] + self.args[-1:]), proc.stdout


def is_binary(where: str, data: bytes) -> bool:
    """Compressed or numeric content (by name or by signature: DVC cache objects have no suffix)."""
    return where.lower().endswith(BINARY_SUFFIXES) or data.startswith(b"\x89PNG") or (
        len(data) > 9 and data[8:10] == b'{"' and int.from_bytes(data[:8], "little") < len(data))  # safetensors


def is_database(where: str, data: bytes) -> bool:
    """A SQLite database, its write-ahead log or journal."""
    return data.startswith(b"SQLite format 3\x00") or where.endswith(("-wal", "-journal", ".db", ".sqlite"))


def scan(stores: Iterable[Store], needles: Needles) -> ScanReport:
    """Read every item of every store once; report each item that holds a needle (and why)."""
    report = ScanReport()
    for store in stores:
        count = 0
        for where, data in store.items():
            count += 1
            for what in needles.find_in_name(where, not store.allow_raw_id):
                report.findings.append(Finding(store.name, where, what))
            if data is None:
                report.unscanned.append(f"{store.name}: {where}")
                continue
            binary = is_binary(where, data)
            database = store.database or is_database(where, data)
            for what in needles.find(data, binary, not store.allow_raw_id, database):
                report.findings.append(Finding(store.name, where, what))
        report.scanned[store.name] = report.scanned.get(store.name, 0) + count
    return report
