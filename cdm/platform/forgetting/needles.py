"""What a revocation's final scan looks for (docs/design.md §5), taken at `begin` and read by `verify`.

    needles = raw id + token public key (+ the token and its sha256 when this process holds it) + the owner's
              sample sha256s, file bytes, decoded pixels, captions (text workspaces) and DVC object ids

The needles are taken once, at `begin`, while the data exists, into `<request_id>.needles.json` (0600, beside the
request record; the scan skips it, `complete` deletes it): a run that resumes after its purge deleted the data
searches for exactly what the first run would have. A verification that searched for less than that file holds
is not ok (`Verification.needles` says what it searched for).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from cdm.platform.data import dvc
from cdm.platform.workspace import owner_records
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.fileio import atomic_write
from cdm.platform.forgetting.record import Revocation, needles_path
from cdm.platform.forgetting.scan import Needles
from cdm.platform.workspace.paths import Workspace


def write_needles(ctx: Context, rec: owner_records.OwnerRecord, path: Path) -> None:
    """What the scan will look for, taken while the owner's data exists: the token's public key, the sample hashes,
    the sample files themselves (their pixels are decoded from them when the scan runs) and the DVC object ids."""
    folder = ctx.ws.owners_dir / rec.owner
    samples = ctx.ws.manifest(rec.owner)["samples"] if folder.exists() else []
    files = _sample_files(folder) if folder.exists() else {}
    captions = ctx.ws.captions(rec.owner) if folder.exists() else {}
    atomic_write(path, json.dumps({
        "token_public_key": rec.token_public_key,
        "token_sha256": rec.token_sha256,  # a record made before signed requests
        "sample_sha256": sorted({s["sha256"] for s in samples}),
        "sample_files": files,
        "captions": captions,  # {file name: caption} of a text owner
        "dvc_objects": sorted(owner_objects(ctx.ws, rec.owner)),
    }))


def _sample_files(folder: Path) -> dict[str, str]:
    """{sha256: base64 bytes} of the PNG files of an owner's folder (class folders, or a text owner's images/)."""
    return {hashlib.sha256(b).hexdigest(): base64.b64encode(b).decode()
            for b in (f.read_bytes() for f in sorted(folder.glob("*/*.png")))}


def needles(ctx: Context, rev: Revocation, token: str | None = None) -> tuple[Needles, bool]:
    """What the verification scan looks for, from the needles file taken at `begin`: the raw id, the token's public
    key, the token (in clear when this process holds it) and its hash, the owner's sample hashes and DVC object ids,
    each sample's file bytes and decoded pixels. Content another remaining owner also holds is theirs and left out.
    Returns (needles, whether pixels are included)."""
    import torch

    from cdm.data import load_image_bytes

    rec = owner_records.record(ctx.ws, rev.owner_key)
    saved = json.loads(needles_path(ctx.ws, rev.request_id).read_text())
    others_sha, others_md5 = _other_owners_content(ctx.ws, rec.owner)
    hex_strings = {h: "sample sha256" for h in saved["sample_sha256"] if h not in others_sha}
    # Per-file object ids only: a `.dir` id hashes the listing of everyone's data folder, and old commits of
    # data.dvc keep it by design (checking them out reports missing cache).
    hex_strings.update({h: "DVC object id of the owner's data" for h in saved["dvc_objects"]
                        if not h.endswith(".dir") and h not in others_md5})
    if saved.get("token_public_key"):
        hex_strings[saved["token_public_key"]] = "token public key"
    # A request that came as an event before signed requests carried the token's sha256 as its proof, which
    # Prefect keeps as a flow parameter by design: not a trace of the owner's data.
    legacy_event = rev.requested_via == "event" and not saved.get("token_public_key")
    if saved.get("token_sha256") and not legacy_event:
        hex_strings[saved["token_sha256"]] = "token sha256"
    if token:
        hex_strings[token] = "token"
        if not legacy_event:
            hex_strings[hashlib.sha256(token.encode()).hexdigest()] = "token sha256"
    blobs: dict[bytes, str] = {}
    d = ctx.params.data
    files = saved.get("sample_files")
    folder = ctx.ws.owners_dir / rec.owner
    if files is None and folder.exists():  # a request begun before the files were recorded: its data, if still there
        files = _sample_files(folder)
    for sha, encoded in sorted((files or {}).items()):
        if sha in others_sha:
            continue  # another remaining owner holds the same content: it stays, rightly
        data = base64.b64decode(encoded)
        blobs[data] = "sample file bytes"
        x = load_image_bytes(data, d.image_size, d.channels)
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()
        if len(set(pixels)) > 2:  # a blank image's bytes are everywhere
            blobs[pixels] = "sample pixels"
    # A text owner's captions: each metadata line (it names the file by its hash), and each caption's text that no
    # remaining owner also holds (a caption both hold is theirs too, like an image both hold).
    others_captions = {t for o in ctx.ws.owners() if o != rec.owner for t in ctx.ws.captions(o).values()}
    for name, text in sorted(saved.get("captions", {}).items()):
        blobs[json.dumps({"file_name": name, "text": text}, ensure_ascii=False).encode()] = "caption line"
        if text not in others_captions:
            blobs[text.encode()] = "sample caption"
    others = tuple(r.owner for k, r in owner_records.records(ctx.ws).items() if k != rev.owner_key)
    return Needles(rec.owner, hex_strings, blobs, others), bool(files)


def needle_counts(found: Needles) -> dict[str, int]:
    """How many needles of each kind a scan searches for (recorded with the verification)."""
    counts: dict[str, int] = {}
    for what in [*found.hex_strings.values(), *found.blobs.values()]:
        counts[what] = counts.get(what, 0) + 1
    return counts


def missing_needles(ctx: Context, rev: Revocation, found: Needles) -> dict[str, list[int]]:
    """What `found` does not search for of what `begin` recorded: each recorded sample (sha256) that no other owner
    holds needs its file bytes among the needles. {"sample file bytes": [searched, recorded]} when some are
    missing (a request begun before the files were recorded, whose data is gone), else {}."""
    saved = json.loads(needles_path(ctx.ws, rev.request_id).read_text())
    others_sha, _ = _other_owners_content(ctx.ws, owner_records.record(ctx.ws, rev.owner_key).owner)
    recorded = set(saved["sample_sha256"]) - others_sha
    searched = {hashlib.sha256(b).hexdigest() for b, what in found.blobs.items() if what == "sample file bytes"}
    if recorded <= searched:
        return {}
    return {"sample file bytes": [len(recorded & searched), len(recorded)]}


def with_tokens(fresh: Needles, found: Needles) -> Needles:
    """`fresh` (the needles file as it reads now: who else holds what is decided now) plus the token strings
    `found` holds (the token in clear, known only to the process that was given it)."""
    tokens = {h: what for h, what in found.hex_strings.items() if what.startswith("token")}
    return Needles(fresh.raw_id, {**fresh.hex_strings, **tokens}, fresh.blobs, fresh.others)


def _other_owners_content(ws: Workspace, owner: str) -> tuple[set[str], set[str]]:
    """(sample sha256s, DVC md5s) of the files every other owner holds."""
    sha, md5 = set(), set()
    for o in ws.owners():
        if o == owner:
            continue
        sha |= {s["sha256"] for s in ws.manifest(o)["samples"]}
        md5 |= {dvc.md5_bytes(p.read_bytes()) for p in ws.owner_dir(o).rglob("*") if p.is_file()}
    return sha, md5


def owner_objects(ws: Workspace, owner: str) -> set[str]:
    """DVC object ids of the owner's files, now and in every cached version, and the directory listings naming
    them."""
    prefix = f"owners/{owner}/"
    ids = set()
    folder = ws.owners_dir / owner
    if folder.exists():
        ids |= {dvc.md5_bytes(p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    for dir_id in dvc.dir_objects(ws.root, prefix=prefix):
        ids.add(dir_id)
        ids |= {e["md5"] for e in dvc.read_dir_object(ws.root, dir_id) if e.get("relpath", "").startswith(prefix)}
    return ids
