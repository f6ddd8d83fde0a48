"""Step `verify`: MLflow asked for versions, runs and tags left, DVC's cache and remote listed, every store scanned
for the needles taken at `begin` (`needles`). Only a verification that found nothing is recorded as the step's
output; one that found anything is kept with the request (`failed_verifications`), reopens the purge and fails
the run (exit 1): the next run purges and verifies again.
"""

from __future__ import annotations

import json
from pathlib import Path
from cdm.platform.data import dvc
from cdm.platform.forgetting.needles import missing_needles, needle_counts, needles, with_tokens
from cdm.platform.forgetting.record import Purged, Revocation, Verification, needles_path, recorded, save
from cdm.platform.forgetting.scan import Needles, ScanReport
from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import CommandFailed


class VerificationFailed(CommandFailed):
    """The scan found traces: the request stays open, its purge is redone by the next run (exit 1)."""


def verify(ctx: Context, rev: Revocation, purged: Purged, found: tuple[Needles, bool],
           prefect_db: Path | None = None, prefect_server: str | None = None) -> Verification:
    """Ask MLflow and DVC what is left, then scan every store for the needles (docs/design.md §5)."""
    from cdm.platform.forgetting.scan import scan
    from cdm.platform.forgetting.stores import workspace_stores

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
    # The needles file as it reads now, with the token in clear when the caller holds it: never less than what
    # `begin` recorded, whichever process runs this.
    fresh, pixels = needles(ctx, rev)
    needle_set = with_tokens(fresh, found[0])
    weaker = missing_needles(ctx, rev, needle_set)
    stores = workspace_stores(ctx, skip=[needles_path(ctx.ws, rev.request_id)], prefect_db=prefect_db,
                              prefect_server=prefect_server)
    report: ScanReport = scan(stores, needle_set)
    ok = report.ok and not any(mlflow.values()) and not any(dvc_left.values()) and not weaker
    return Verification(ok=ok, mlflow=mlflow, dvc=dvc_left, scan=report.as_dict(), pixel_search=pixels,
                        needles=needle_counts(needle_set), needles_missing=weaker)


def run(ctx: Context, rev: Revocation, purged: Purged, found: tuple[Needles, bool],
        prefect_db: Path | None = None, prefect_server: str | None = None) -> Verification:
    """`verify`, recorded when it found nothing; otherwise kept in `failed_verifications`, the purge reopened
    (`rev.purge` cleared, in the same write) and `VerificationFailed` raised."""
    def checked() -> Verification:
        result = verify(ctx, rev, purged, found, prefect_db, prefect_server)
        if not result.ok:
            rev.failed_verifications.append(result.model_dump())
            rev.purge = None
            save(ctx.ws, rev)
            findings = result.scan.get("findings", [])[:3] or [result.mlflow, result.dvc]
            raise VerificationFailed(f"verification found traces of {rev.owner_key}; the request stays open "
                                     f"and the next run purges again: {json.dumps(findings)}", code=1)
        return result

    return recorded(ctx.ws, rev, "verify", checked)
