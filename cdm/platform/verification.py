"""Verification of a revocation: what the scan looks for (needles) and the `verify` step (docs/design.md §5).

    needles = raw id + token sha256 + the owner's sample sha256s and DVC object ids (+ file bytes and pixels while
              the data exists)
    verify  = MLflow asked for versions, runs and tags left + DVC cache and remote listed + every store scanned
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from cdm.platform import dvc, owner_records, registry
from cdm.platform.context import Context
from cdm.platform.fileio import atomic_write
from cdm.platform.revocations import Purged, Revocation, Verification, needles_path
from cdm.platform.scan import Needles, ScanReport
from cdm.platform.workspace import Workspace


def write_needles(ctx: Context, owner: str, token_sha256: str | None, path: Path) -> None:
    """Hashes of what the scan looks for, taken while the owner's data exists (no pixels: those stay in memory)."""
    samples = ctx.ws.manifest(owner)["samples"] if (ctx.ws.owners_dir / owner).exists() else []
    atomic_write(path, json.dumps({
        "token_sha256": token_sha256,
        "sample_sha256": sorted({s["sha256"] for s in samples}),
        "dvc_objects": sorted(owner_objects(ctx.ws, owner)),
    }))


def needles(ctx: Context, rev: Revocation, token: str | None = None) -> tuple[Needles, bool]:
    """What the verification scan looks for: the raw id, the token (in clear when this process holds it) and its
    hash, the owner's sample hashes and DVC object ids, and — when the data still exists (it does, except after an
    interrupted purge) — each sample's file bytes and decoded pixels. Returns (needles, whether pixels are
    included)."""
    rec = owner_records.record(ctx.ws, rev.owner_key)
    saved = json.loads(needles_path(ctx.ws, rev.request_id).read_text())
    # Content another remaining owner also holds is theirs: its hashes and bytes are not the revoked owner's trace.
    others_sha, others_md5 = _other_owners_content(ctx.ws, rec.owner)
    hex_strings = {h: "sample sha256" for h in saved["sample_sha256"] if h not in others_sha}
    # Per-file object ids only: a `.dir` id hashes the listing of everyone's data folder, and old commits of
    # data.dvc keep it by design (checking them out reports missing cache).
    hex_strings.update({h: "DVC object id of the owner's data" for h in saved["dvc_objects"]
                        if not h.endswith(".dir") and h not in others_md5})
    if saved["token_sha256"] and rev.requested_via == "command":  # an event's proof is stored by Prefect by design
        hex_strings[saved["token_sha256"]] = "token sha256"
    if token:
        hex_strings[token] = "token"
    blobs: dict[bytes, str] = {}
    folder = ctx.ws.owners_dir / rec.owner
    if folder.exists():
        d = ctx.params.data
        owned = ctx.ws.load_owner(rec.owner, d.image_size, d.channels, d.labels)
        for f in sorted(folder.glob("*/*.png")):
            data = f.read_bytes()
            if hashlib.sha256(data).hexdigest() in others_sha:
                continue  # another remaining owner holds the same content: it stays, rightly
            blobs[data] = "sample file bytes"
        for sid, x in zip(owned.ids, owned.x):
            pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()
            if len(set(pixels)) > 2 and sid not in others_sha:  # a blank image's bytes are everywhere
                blobs[pixels] = "sample pixels"
    others = tuple(r.owner for k, r in owner_records.records(ctx.ws).items() if k != rev.owner_key)
    return Needles(rec.owner, hex_strings, blobs, others), folder.exists()


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


def verify(ctx: Context, rev: Revocation, purged: Purged, found: tuple[Needles, bool],
           prefect_db: Path | None = None, prefect_server: str | None = None) -> Verification:
    """Ask MLflow and DVC what is left, then scan every store for the needles (docs/design.md §5)."""
    from cdm.platform.scan import scan
    from cdm.platform.stores import workspace_stores

    c, key = ctx.client, rev.owner_key
    keep = {v for v in ((rev.go_live.composite_live if rev.go_live else None),
                        (rev.retrain.composite_after if rev.retrain else None)) if v}
    mlflow = {
        "versions_left": [v for v in purged.versions if registry.version_exists(c, *v.rsplit("/", 1))],
        "runs_left": sorted({r for r in purged.runs if registry.run_exists(c, r)}
                            | {r.info.run_id for r in registry.runs_of_owner(c, key)}),
        "tags_with_owner_key": [f"{m}/{v}" for m, v in registry.versions_tagged(c, key)
                                if not (m == registry.COMPOSITE and v in keep)],
    }
    saved = json.loads(needles_path(ctx.ws, rev.request_id).read_text())
    listing = dvc.list_objects(ctx.ws.root, s3_client=ctx.dvc_s3())
    gone = set(saved["dvc_objects"]) - {purged.data_hash or ""}
    held = {dvc.md5_bytes(p.read_bytes()) for p in ctx.ws.owners_dir.rglob("*") if p.is_file()}
    dvc_left = {"cache": sorted((gone - held) & listing["cache"]), "remote": sorted((gone - held) & listing["remote"])}
    needle_set, pixels = found
    stores = workspace_stores(ctx, skip=[needles_path(ctx.ws, rev.request_id)], prefect_db=prefect_db,
                              prefect_server=prefect_server)
    report: ScanReport = scan(stores, needle_set)
    ok = report.ok and not any(mlflow.values()) and not any(dvc_left.values())
    return Verification(ok=ok, mlflow=mlflow, dvc=dvc_left, scan=report.as_dict(), pixel_search=pixels)
