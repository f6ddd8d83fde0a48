"""The trace scan: look through every store cdm writes for what a revoked owner left behind (docs/design.md §5).

    needles (raw id, token hash, sample hashes, sample bytes)  x  stores (folders, git objects, S3 prefixes)
      -> ScanReport {store: items scanned} + findings [(store, where, what)]

A store is anything that yields `(where, bytes)` items. Matching rules:
- the raw id as a substring (`carol` in `carol_photos`), in any case (`Carol`, `CAROL`), and through the common
  encodings: UTF-16 (both byte orders), hex, base64 (each of the three alignments, where they fix at least six
  characters), JSON `\\u` escapes; inside gzip members too. An occurrence that lies inside the id of another owner
  who is still in the workspace (`carol` inside `carolyn`) is that owner's, not a trace. Ids shorter than four
  characters would match common words: for them the match needs a boundary on both sides (not a letter or digit).
- in database pages (SQLite and its WAL, dumps) and other binary items only the id's usual cases are matched
  (`carol`, `CAROL`, `Carol`): any-case matching of a short id in random bytes would fire by chance; bytes of an
  unknown binary format are not searched for a short id at all (new owner ids have at least three characters,
  `workspace.MIN_NEW_OWNER_ID`);
- compressed or numeric formats are searched for the raw id only where they keep text: PNG text chunks, the member
  names and pickles of a zip (torch's `.pt`), a safetensors header; never their pixel or weight bytes;
- hex strings (token sha256, sample sha256s, DVC md5s) and raw sample bytes (file contents and decoded pixels)
  as plain substrings, everywhere (hex strings in any case);
- item names (paths, object keys) are searched for the raw id and the hex strings too.
"""

from __future__ import annotations

import base64
import gzip
import io
import re
import subprocess
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Formats whose bytes are compressed or numeric: searched for sample bytes and hex strings everywhere, for the raw
# id only in the parts that keep text (`text_regions`).
BINARY_SUFFIXES = (".png", ".safetensors", ".pt", ".pth", ".npy", ".jpg", ".jpeg", ".gif", ".webp", ".ico", ".zip",
                   ".woff", ".woff2", ".ttf", ".eot")
MAX_ITEM_BYTES = 256 << 20  # larger files are reported as unscanned, never silently skipped
SHORT_ID = 4  # ids shorter than this need word boundaries (see above)
MIN_BASE64_CHARS = 6  # base64 fragments shorter than this match random base64 text by chance


def _base64_forms(raw: bytes) -> set[bytes]:
    """The base64 characters fixed by `raw` alone, at each of the three byte alignments it can start at."""
    forms = set()
    for k in range(3):
        encoded = base64.b64encode(b"\0" * k + raw)
        first, last = -(-8 * k // 6), (8 * (k + len(raw))) // 6  # characters [first, last) hold only `raw`'s bits
        if last - first >= MIN_BASE64_CHARS:
            forms.add(encoded[first:last])
    return forms


@dataclass
class Needles:
    """What must not remain. `raw_id` may be None (e.g. a scan for hashes only). `others`: ids of owners still in
    the workspace (their occurrences are theirs)."""

    raw_id: str | None
    hex_strings: dict[str, str] = field(default_factory=dict)  # value -> what it is ("token sha256", ...)
    blobs: dict[bytes, str] = field(default_factory=dict)  # exact bytes (a sample file, its pixels) -> what
    others: tuple[str, ...] = ()

    def __post_init__(self):
        self._text = self._exact = self._others = None
        self._hex_lower = {h.lower(): what for h, what in self.hex_strings.items()}
        # Hex digests are found through the runs of hex digits that hold them (one pass of a simple pattern, then
        # set lookups of each window of a run): an alternation of hundreds of digests costs minutes on a workspace.
        hexes = [h for h in self._hex_lower if HEX_DIGITS.fullmatch(h.encode())]
        self._hex_lengths = sorted({len(h) for h in hexes})
        self._hex_runs = re.compile(rb"[0-9a-fA-F]{%d,}" % self._hex_lengths[0]) if hexes else None
        rest = [h for h in self._hex_lower if h not in set(hexes)]  # a token, in clear
        self._hex = re.compile(b"|".join(re.escape(h.encode()) for h in rest), re.I) if rest else None
        if not self.raw_id:
            return
        raw = self.raw_id.encode()
        short = len(self.raw_id) < SHORT_ID
        left, right = (rb"(?<![A-Za-z0-9])", rb"(?![A-Za-z0-9])") if short else (b"", b"")
        plain = left + re.escape(raw) + right
        encoded = [re.escape(raw.decode().encode("utf-16-le")), re.escape(raw.decode().encode("utf-16-be")),
                   re.escape(raw.hex().encode()), re.escape("".join(f"\\u{ord(c):04x}" for c in self.raw_id).encode())]
        encoded += [re.escape(f) for f in _base64_forms(raw)]
        self._text = re.compile(b"|".join([plain, *encoded]), re.I)
        cases = {raw, raw.upper(), raw.decode().title().encode()}
        self._exact = re.compile(b"|".join([left + re.escape(c) + right for c in sorted(cases)] + encoded[:2]))
        # Other owners' ids that contain this one, in the same cases: a match inside one of them is theirs.
        self._others = re.compile(b"|".join(re.escape(o.encode()) for o in self.others
                                            if self.raw_id.lower() in o.lower() and o != self.raw_id), re.I) \
            if any(self.raw_id.lower() in o.lower() and o != self.raw_id for o in self.others) else None

    def _id_found(self, data: bytes, pattern: re.Pattern) -> bool:
        if self._others is None:
            return pattern.search(data) is not None
        theirs = [m.span() for m in self._others.finditer(data)]
        return any(not any(a <= m.start() and m.end() <= b for a, b in theirs) for m in pattern.finditer(data))

    def find(self, data: bytes, binary: bool, raw_id: bool = True, database: bool = False,
             where: str = "") -> list[str]:
        found = []
        if raw_id and self._text is not None:
            if binary:
                hit = any(self._id_found(region, self._exact) for region in text_regions(where, data))
            elif database or _is_text(data):
                hit = self._id_found(data, self._exact if database else self._text)
            else:  # bytes of an unknown format: a short id would match them by chance
                hit = len(self.raw_id) >= SHORT_ID and self._id_found(data, self._exact)
            if hit:
                found.append("raw owner id")
        found += sorted(self._hex_found(data))
        found += sorted({what for blob, what in self.blobs.items() if blob in data})
        return found

    def _hex_found(self, data: bytes) -> set[str]:
        """What the hex strings found in `data` are, each searched for as a substring in any case (a digest inside a
        longer run of hex digits, or overlapping another, is found too)."""
        found = set()
        if self._hex_runs is not None:
            for m in self._hex_runs.finditer(data):
                run = m.group().decode().lower()
                for n in self._hex_lengths:
                    found.update(self._hex_lower[w] for i in range(len(run) - n + 1)
                                 if (w := run[i:i + n]) in self._hex_lower)
        if self._hex is not None:
            found.update(self._hex_lower[m.group().decode().lower()] for m in self._hex.finditer(data))
        return found

    def find_in_name(self, name: str, raw_id: bool = True) -> list[str]:
        found = []
        if raw_id and self._text is not None and self._id_found(name.encode(), self._text):
            found.append("raw owner id in name")
        found += sorted({f"{what} in name" for value, what in self.hex_strings.items() if value.lower() in name.lower()})
        return found


HEX_DIGITS = re.compile(rb"[0-9a-fA-F]+")


def _is_text(data: bytes) -> bool:
    """UTF-8 text (a sample of it): any-case matching is safe there."""
    try:
        data[:65536].decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > 65530  # a character cut at the sample's end
    return True


def text_regions(where: str, data: bytes) -> list[bytes]:
    """The parts of a compressed or numeric file that keep text: PNG text chunks, a zip's member names and
    non-tensor members (torch's pickles), a safetensors header."""
    if data.startswith(b"\x89PNG"):
        out, pos = [], 8
        while pos + 8 <= len(data):
            size, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
            body = data[pos + 8:pos + 8 + size]
            if kind == b"zTXt":
                key, _, rest = body.partition(b"\0")
                out.append(key + b" " + _inflate(rest[1:]))
            elif kind in (b"tEXt", b"iTXt"):
                out.append(body)
            pos += 12 + size
        return out
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                return [n.encode() for n in z.namelist()] + [z.read(n) for n in z.namelist()
                                                            if not n.split("/")[-2:-1] == ["data"]]
        except (zipfile.BadZipFile, OSError):
            return []
    if len(data) > 9 and data[8:10] == b'{"':
        size = int.from_bytes(data[:8], "little")
        return [data[8:8 + size]] if size < len(data) else []
    return []


def _inflate(data: bytes) -> bytes:
    try:
        return zlib.decompress(data)
    except zlib.error:
        return b""


def gunzip(data: bytes) -> bytes | None:
    """A gzip member's content (None if `data` is not gzip)."""
    if not data.startswith(b"\x1f\x8b"):
        return None
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return None


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
        from botocore.exceptions import ClientError

        from cdm.platform.data.dvc import s3_versions

        # Every version on a versioned bucket (a delete there only hides the object behind a marker).
        for key, version in s3_versions(self.client, self.bucket, self.prefix):
            where = f"s3://{self.bucket}/{key}" + (f"?versionId={version}" if version else "")
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=key, **({"VersionId": version} if version
                                                                                else {}))
            except ClientError as e:
                if e.response["ResponseMetadata"]["HTTPStatusCode"] != 405:
                    raise  # an outage is not an empty store
                yield where, key.encode()  # a delete marker has no body: its key is what it holds
                continue
            data = None if head["ContentLength"] > MAX_ITEM_BYTES else self.client.get_object(
                Bucket=self.bucket, Key=key, **({"VersionId": version} if version else {}))["Body"].read()
            yield where, data


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
            inflated = gunzip(data)
            for name, content in [(where, data)] + ([(f"{where} (gunzipped)", inflated)] if inflated else []):
                binary = is_binary(name.removesuffix(" (gunzipped)").removesuffix(".gz"), content)
                database = store.database or is_database(name, content)
                for what in needles.find(content, binary, not store.allow_raw_id, database, name):
                    report.findings.append(Finding(store.name, name, what))
        report.scanned[store.name] = report.scanned.get(store.name, 0) + count
    return report
