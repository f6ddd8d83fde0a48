"""Ingestion of one owner's batch: read the source, validate, commit atomically, version with DVC.

A rejected batch raises `IngestionRejected` with the report; the workspace is left exactly as it was.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cdm import dvc
from cdm.config import Params
from cdm.sources import SourceFile, list_folder, list_s3
from cdm.validation import Limits, ValidationReport, validate_batch
from cdm.workspace import Workspace, WorkspaceError, check_owner_id, git, now


class IngestionRejected(WorkspaceError):
    def __init__(self, owner: str, report: ValidationReport):
        self.owner, self.report = owner, report
        lines = "\n".join(f"  {p.file}: {p.reason}" for p in report.problems)
        docs = f"\nData Docs: {report.docs}" if report.docs else ""
        super().__init__(f"ingestion of {owner!r} rejected, nothing was changed:\n{lines}{docs}")

    def __reduce__(self):  # picklable with its report: Prefect may persist a failed task's exception
        return (IngestionRejected, (self.owner, self.report))


@dataclass
class IngestResult:
    owner: str
    owner_key: str
    added: int
    total: int
    data_hash: str | None
    token: str | None  # issued at first ingestion only; stored as a hash
    docs: str | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def limits_of(params: Params) -> Limits:
    d = params.data
    return Limits(d.labels, d.max_file_bytes, d.min_dimension, d.max_dimension, d.max_files)


def read_source(ws: Workspace, source: str, max_bytes: int) -> list[SourceFile]:
    if source.startswith("s3://"):
        return list_s3(source, ws.s3_client(), max_bytes)
    return list_folder(source, max_bytes)


def owner_metadata(files: list[SourceFile], license: str | None) -> dict:
    """license and contact from an optional `owner.yaml` at the source's top; `--license` wins."""
    import yaml

    meta = {}
    for f in files:
        if f.path == "owner.yaml" and f.data is not None:
            try:
                raw = yaml.safe_load(f.data.decode("utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise WorkspaceError(f"owner.yaml: not valid YAML ({e})") from None
            if not isinstance(raw, dict):
                raise WorkspaceError("owner.yaml: expected a mapping with 'license' and 'contact'")
            meta = {k: str(raw[k]) for k in ("license", "contact") if raw.get(k) is not None}
    if license:
        meta["license"] = license
    return meta


def validate(ws: Workspace, owner: str, files: list[SourceFile], params: Params) -> ValidationReport:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    docs = ws.reports_dir / f"ingest-{owner}-{stamp}-{uuid.uuid4().hex[:6]}"
    return validate_batch(files, limits_of(params), docs_dir=docs)


def commit(ws: Workspace, owner: str, files: list[SourceFile], meta: dict, push: bool = True,
           retry_delays: Sequence[float] = (1.0, 4.0)) -> IngestResult:
    """Commit a validated batch: owner folder + manifest, `dvc add data`, `dvc push`, git commit of data.dvc.

    Any failure restores the previous owner folder and data.dvc. `retry_delays`: waits between push attempts.
    """
    with ws.lock():
        return _commit_locked(ws, owner, files, meta, push, retry_delays)


def _commit_locked(ws: Workspace, owner: str, files: list[SourceFile], meta: dict, push: bool,
                   retry_delays: Sequence[float]) -> IngestResult:
    recover_interrupted(ws)
    key = ws.owner_key(owner)
    target = ws.owner_dir(owner)
    before = len(ws.manifest(owner)["samples"]) if target.exists() else 0
    pairs = [(f.path.split("/")[0], f.data) for f in files if f.path != "owner.yaml"]
    # A journal makes the commit all-or-nothing even across kill -9: until it says "committed", a later run
    # restores the previous owner folder and data.dvc and deletes the batch's objects from cache and remote.
    journal = _begin_journal(ws, owner, target, [d for _, d in pairs])
    try:
        manifest = ws.commit_owner_files(owner, pairs, meta)
        data_hash = dvc.add_and_push(ws.root, push=push, retry_delays=retry_delays)
        git(ws.root, "add", "data.dvc", ".gitignore")
        git(ws.root, "commit", "-q", "-m", f"data: ingest {key}", "--allow-empty")
        _end_journal(journal)
    except BaseException as failure:
        try:
            recover_interrupted(ws)
        except Exception as cleanup:  # e.g. the remote is still down: local state is restored, the journal stays
            raise dvc.RemoteError(
                f"{failure}\nThe batch was rolled back in the workspace; removing the objects it pushed from the "
                f"remote failed too ({type(cleanup).__name__}: {cleanup}). The next ingestion or revocation in this "
                "workspace finishes that cleanup.") from failure
        raise
    token = None
    record = ws.owner_records().get(key, {})
    if "token_sha256" not in record:
        import hashlib

        token = secrets.token_urlsafe(24)
        record["token_sha256"] = hashlib.sha256(token.encode()).hexdigest()
    ws.update_owner_record(key, state="active", license=manifest.get("license"), token_sha256=record["token_sha256"],
                           updated=now())
    return IngestResult(owner, key, len(manifest["samples"]) - before, len(manifest["samples"]), data_hash, token, None)


def _begin_journal(ws: Workspace, owner: str, target, batch: list[bytes]):
    ws.staging_dir.mkdir(parents=True, exist_ok=True)
    stamp = uuid.uuid4().hex[:8]
    backup = ws.staging_dir / f"backup-{owner}-{stamp}"
    if target.exists():
        shutil.copytree(target, backup)
    dvc_file = ws.root / "data.dvc"
    journal = ws.staging_dir / f"journal-{owner}-{stamp}.json"
    tmp = journal.with_suffix(".tmp")
    tmp.write_text(json.dumps({"owner": owner, "backup": str(backup) if target.exists() else None,
                               "data_dvc": dvc_file.read_text() if dvc_file.exists() else None,
                               "objects": sorted({dvc.md5_bytes(d) for d in batch})}))
    tmp.replace(journal)
    return journal


def _end_journal(journal) -> None:
    state = json.loads(journal.read_text())
    journal.unlink()
    if state["backup"]:
        shutil.rmtree(state["backup"], ignore_errors=True)


def recover_interrupted(ws: Workspace) -> list[str]:
    """Undo ingestions that did not reach their git commit (crash, kill -9, failed push). Returns the owners."""
    undone = []
    for journal in sorted(ws.staging_dir.glob("journal-*.json")) if ws.staging_dir.exists() else []:
        state = json.loads(journal.read_text())
        target = ws.owner_dir(state["owner"])
        shutil.rmtree(target, ignore_errors=True)
        if state["backup"] and Path(state["backup"]).exists():
            shutil.copytree(state["backup"], target)
        if state["data_dvc"] is not None:
            (ws.root / "data.dvc").write_text(state["data_dvc"])
        # Objects of the aborted batch that no remaining file holds leave the cache and the remote.
        held = {dvc.md5_bytes(p.read_bytes()) for p in ws.owners_dir.rglob("*") if p.is_file()}
        current = dvc.data_hash(ws.root)
        aborted = [d for d in dvc.dir_objects(ws.root, md5s=set(state["objects"])) if d != current]
        listed = {e["md5"] for d in aborted for e in dvc.read_dir_object(ws.root, d)
                  if e.get("relpath", "").startswith(f"owners/{state['owner']}/")}
        orphans = ((set(state["objects"]) | listed) - held) | set(aborted)
        if orphans:
            s3 = ws.dvc_s3_client()
            dvc.delete_objects(ws.root, orphans, s3_client=s3)
        _end_journal(journal)
        undone.append(state["owner"])
    for leftover in ws.staging_dir.iterdir() if ws.staging_dir.exists() else []:
        if not leftover.name.startswith("journal-"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
    return undone


def ingest(ws: Workspace, owner: str, source: str, params: Params, license: str | None = None,
           push: bool = True) -> IngestResult:
    """The whole ingestion in one call (the flow runs the same steps as separate tasks)."""
    check_owner_id(owner)
    files = read_source(ws, source, params.data.max_file_bytes)
    meta = owner_metadata(files, license)
    report = validate(ws, owner, files, params)
    if not report.ok:
        raise IngestionRejected(owner, report)
    result = commit(ws, owner, files, meta, push=push, retry_delays=params.data.push_retry_delays)
    result.docs = report.docs
    return result
