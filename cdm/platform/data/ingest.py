"""Ingestion of one owner's batch: read the source, validate, commit atomically, version with DVC.

    request (owner record: raw id, absolute source) -> read -> validate (great-expectations) -> commit under the lock

A rejected batch raises `IngestionRejected` with the report; the workspace is left as it was (the report is kept
under `.cdm/reports/ingest-<owner key>-*`). A revoked owner is refused before anything is read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cdm.config import Params
from cdm.platform.data import dvc
from cdm.platform.workspace import owner_records
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.workspace.fileio import atomic_write
from cdm.platform.workspace.gitrepo import commit as git_commit
from cdm.platform.data.sources import SourceFile, list_folder, list_s3
from cdm.platform.data.validation import Limits, ValidationReport, validate_batch
from cdm.platform.workspace.paths import Workspace, check_new_owner_id, check_owner_id, now


class IngestionRejected(WorkspaceError):
    def __init__(self, owner_key: str, report: ValidationReport):
        self.owner_key, self.report = owner_key, report
        lines = "\n".join(f"  {p.file}: {p.reason}" for p in report.problems)
        docs = f"\nData Docs: {report.docs}" if report.docs else ""
        super().__init__(f"ingestion of {owner_key} rejected, nothing was changed:\n{lines}{docs}")

    def __reduce__(self):  # picklable with its report: Prefect may persist a failed task's exception
        return (IngestionRejected, (self.owner_key, self.report))

    def summary(self) -> str:
        """One line: how many files were refused and the first reason."""
        first = self.report.problems[0] if self.report.problems else None
        more = f" (+{len(self.report.problems) - 1} more)" if len(self.report.problems) > 1 else ""
        return f"batch rejected, nothing was changed: {first.file}: {first.reason}{more}" if first else str(self)


@dataclass
class IngestResult:
    owner_key: str
    added: int
    total: int
    data_hash: str | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def absolute_source(source: str) -> str:
    """A source as recorded: s3:// URLs as they are, folders absolute (schedules must not depend on the current
    folder)."""
    return source if source.startswith("s3://") else str(Path(source).expanduser().resolve())


@contextlib.contextmanager
def requested(ctx: Context, owner: str, source: str, license: str | None = None, cron: str | None = None):
    """Record an ingestion request in the owner record (raw id, absolute source, license, schedule) and yield the
    owner key. A revoked owner is refused. If the body fails, the record is put back as it was (none, for a new
    owner): a refused batch changes nothing."""
    key, before = owner_records.record_of(ctx.ws, check_owner_id(owner))
    if before is None:
        check_new_owner_id(owner)
    owner_records.require_consent(before, key)
    source = absolute_source(source)
    fields = {"owner": owner, "source": source, **({"license": license} if license else {}),
              **({"cron": cron} if cron else {})}
    owner_records.update(ctx.ws, key, **fields)
    try:
        yield key
    except BaseException:
        if before is None:
            owner_records.remove(ctx.ws, key)
        else:
            owner_records.update(ctx.ws, key, **before.model_dump(exclude={"updated"}))
        raise


def ingest(ctx: Context, owner: str, source: str, license: str | None = None, push: bool = True) -> IngestResult:
    """The whole ingestion in one call, without Prefect (the flow runs the same steps as tasks)."""
    with requested(ctx, owner, source, license) as key:
        files = read_source(ctx, owner_records.record(ctx.ws, key).source)
        report = validate(ctx, key, files)
        if not report.ok:
            raise IngestionRejected(key, report)
        return commit(ctx, key, files, owner_metadata(files, license or owner_records.record(ctx.ws, key).license),
                      push=push)


def limits_of(params: Params) -> Limits:
    d = params.data
    return Limits(d.labels, d.max_file_bytes, d.min_dimension, d.max_dimension, d.max_files, d.max_caption_chars)


def read_source(ctx: Context, source: str) -> list[SourceFile]:
    max_bytes = ctx.params.data.max_file_bytes
    return list_s3(source, ctx.s3(), max_bytes) if source.startswith("s3://") else list_folder(source, max_bytes)


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


def validate(ctx: Context, owner_key: str, files: list[SourceFile]) -> ValidationReport:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    docs = ctx.ws.reports_dir / f"ingest-{owner_key}-{stamp}-{uuid.uuid4().hex[:6]}"
    if ctx.params.data.conditioning == "text":
        from cdm.platform.data.validation import validate_captioned_batch

        batch = [f for f in files if f.path != "owner.yaml"]
        return validate_captioned_batch(batch, limits_of(ctx.params), docs_dir=docs)
    return validate_batch(files, limits_of(ctx.params), docs_dir=docs)


TEXT_FOLDER = "images"  # a text owner's imagefolder inside their folder: images/<sha256>.png + images/metadata.jsonl


def batch_entries(ctx: Context, files: list[SourceFile]) -> list[tuple[str, bytes, str | None]]:
    """A validated batch as (folder, png bytes, caption): the label folder and no caption for a class workspace;
    `images` and the file's caption from metadata.jsonl for a text one."""
    if ctx.params.data.conditioning != "text":
        return [(f.path.split("/")[0], f.data, None) for f in files if f.path != "owner.yaml"]
    from cdm.text.captions import METADATA, parse_metadata

    meta = next(f for f in files if f.path == METADATA)
    captions = {r["file_name"]: r["text"] for r in parse_metadata(meta.data, ctx.params.data.max_caption_chars)}
    return [(TEXT_FOLDER, f.data, captions[f.path]) for f in files if f.path not in (METADATA, "owner.yaml")]


def commit(ctx: Context, owner_key: str, files: list[SourceFile], meta: dict, push: bool = True) -> IngestResult:
    """Commit a validated batch: owner folder + manifest, `dvc add data`, `dvc push`, git commit of data.dvc.

    Runs under the workspace lock; the owner's consent is checked again there (a revocation may have started since
    the batch was read). Any failure restores the previous owner folder and data.dvc.
    """
    ws = ctx.ws
    with ws.lock():
        rec = owner_records.record(ws, owner_key)
        owner_records.require_consent(rec, owner_key)
        recover_interrupted(ctx, keep=owner_key)  # this batch's own record stays: it is being committed now
        target = ws.owner_dir(rec.owner)
        before = len(ws.manifest(rec.owner)["samples"]) if target.exists() else 0
        pairs = batch_entries(ctx, files)
        # A journal makes the commit all-or-nothing even across kill -9: until it is gone, a later run restores the
        # previous owner folder and data.dvc and deletes the batch's objects from cache and remote. (A Prefect
        # transaction's rollback hooks run in the process that failed; after kill -9 there is no such process, and
        # the undo must be done by the next command, which may not even run under Prefect.)
        journal = _begin_journal(ws, owner_key, rec.owner, target, [d for _, d, _ in pairs])
        try:
            manifest = _write_owner_files(ws, owner_key, rec.owner, pairs, meta)
            data_hash = dvc.add_and_push(ws.root, push=push, retry_delays=ctx.params.data.push_retry_delays)
            git_commit(ws.root, f"data: ingest {owner_key}", "data.dvc", ".gitignore")
            _end_journal(journal)
        except BaseException as failure:
            if not isinstance(failure, Exception):
                # Interrupted (Ctrl-C, a cancellation, an exit): DVC's uploads run on fsspec's event-loop thread and
                # may still land after this thread stopped waiting for them, so deleting objects now could race
                # them. The owner's folder and data.dvc are put back at once (no reader sees the batch); the journal
                # stays, and the next command under the workspace lock deletes the objects, as after kill -9.
                _restore_files(ws, json.loads(journal.read_text()))
                raise
            try:
                recover_interrupted(ctx)
            except Exception as cleanup:  # e.g. the remote is still down: local state is restored, the journal stays
                raise dvc.RemoteError(
                    f"{failure}\nThe batch was rolled back in the workspace; removing the objects it pushed from the "
                    f"remote failed too ({type(cleanup).__name__}: {cleanup}). The next ingestion or revocation in "
                    "this workspace finishes that cleanup.") from failure
            raise
        owner_records.update(ws, owner_key, state="active", license=manifest.get("license"),
                             consents=rec.consents or [now()])
    return IngestResult(owner_key, len(manifest["samples"]) - before, len(manifest["samples"]), data_hash)


def _write_owner_files(ws: Workspace, key: str, owner: str, files: Sequence[tuple[str, bytes, str | None]],
                       meta: dict) -> dict:
    """Atomically add `files` [(label folder, png bytes, caption)] to the owner's folder and manifest (captioned
    files: `images/<sha256>.png` and a line of `images/metadata.jsonl`; an image already there keeps its caption):
    the new folder is assembled in staging and swapped in with renames; on any error the old folder stays. Returns
    the new manifest. Captions live in metadata.jsonl only (DVC-tracked with the images), never in the manifest."""
    from cdm.data import sha256_bytes
    from cdm.text.captions import METADATA

    target = ws.owner_dir(owner)
    batch = uuid.uuid4().hex[:12]
    stage = ws.staging_dir / f"{key}-{batch}"
    stage.mkdir(parents=True)
    try:
        if target.exists():
            shutil.copytree(target, stage, dirs_exist_ok=True)
            manifest = json.loads((stage / "manifest.json").read_text())
        else:
            manifest = {"owner": owner, "samples": []}
        manifest.update({k: v for k, v in meta.items() if v is not None})
        known = {(str(s.get("label", TEXT_FOLDER)), s["sha256"]) for s in manifest["samples"]}
        consent = now()
        captions: dict[str, str] = {}
        for folder, data, caption in files:
            digest = sha256_bytes(data)
            if (folder, digest) in known:
                continue
            path = stage / folder / f"{digest}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            sample = {"sha256": digest, "license": manifest.get("license"), "consent_time": consent, "batch": batch}
            if caption is None:
                sample["label"] = int(folder)
            else:
                captions[path.name] = caption
            manifest["samples"].append(sample)
            known.add((folder, digest))
        if captions:
            lines = stage / TEXT_FOLDER / METADATA
            old_lines = lines.read_text(encoding="utf-8").splitlines() if lines.exists() else []
            new_lines = [json.dumps({"file_name": n, "text": t}, ensure_ascii=False) for n, t in sorted(captions.items())]
            lines.write_text("\n".join(sorted([ln for ln in old_lines if ln.strip()] + new_lines)) + "\n",
                             encoding="utf-8")
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        ws.owners_dir.mkdir(parents=True, exist_ok=True)
        old = ws.staging_dir / f"{key}-{batch}-old"
        if target.exists():
            target.rename(old)
        stage.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _begin_journal(ws: Workspace, key: str, owner: str, target: Path, batch: list[bytes]) -> Path:
    ws.staging_dir.mkdir(parents=True, exist_ok=True)
    stamp = uuid.uuid4().hex[:8]
    backup = ws.staging_dir / f"backup-{key}-{stamp}"
    if target.exists():
        shutil.copytree(target, backup)
    dvc_file = ws.root / "data.dvc"
    journal = ws.staging_dir / f"journal-{key}-{stamp}.json"
    atomic_write(journal, json.dumps({"owner_key": key, "owner": owner, "backup": str(backup) if target.exists() else None,
                               "data_dvc": dvc_file.read_text() if dvc_file.exists() else None,
                               "objects": sorted({dvc.md5_bytes(d) for d in batch})}))
    return journal


def _end_journal(journal: Path) -> None:
    state = json.loads(journal.read_text())
    journal.unlink()
    if state["backup"]:
        shutil.rmtree(state["backup"], ignore_errors=True)


def _restore_files(ws: Workspace, state: dict) -> Path:
    """Put an interrupted batch's owner folder and data.dvc back as the journal recorded them (idempotent)."""
    target = ws.owner_dir(state["owner"])
    shutil.rmtree(target, ignore_errors=True)
    if state["backup"] and Path(state["backup"]).exists():
        shutil.copytree(state["backup"], target)
    if state["data_dvc"] is not None:
        (ws.root / "data.dvc").write_text(state["data_dvc"])
    return target


def recover_interrupted(ctx: Context, keep: str | None = None) -> list[str]:
    """Undo ingestions that did not reach their git commit (crash, kill -9, failed push). The caller holds the
    workspace lock, so no ingestion is in flight: every journal left is an interrupted one. The record of a first
    ingestion that never committed is removed, except `keep`'s: the owner whose batch the caller commits next (a
    rerun after a kill -9 of that owner's first ingestion). Returns owner keys."""
    ws, undone = ctx.ws, []
    for journal in sorted(ws.staging_dir.glob("journal-*.json")) if ws.staging_dir.exists() else []:
        state = json.loads(journal.read_text())
        owner = state["owner"]  # the journal may outlive the record of a first ingestion that failed
        target = _restore_files(ws, state)
        # Objects of the aborted batch that no remaining file holds leave the cache and the remote.
        held = {dvc.md5_bytes(p.read_bytes()) for p in ws.owners_dir.rglob("*") if p.is_file()}
        current = dvc.data_hash(ws.root)
        aborted = [d for d in dvc.dir_objects(ws.root, md5s=set(state["objects"])) if d != current]
        listed = {e["md5"] for d in aborted for e in dvc.read_dir_object(ws.root, d)
                  if e.get("relpath", "").startswith(f"owners/{owner}/")}
        orphans = ((set(state["objects"]) | listed) - held) | set(aborted)
        if orphans:
            dvc.delete_objects(ws.root, orphans, s3_client=ctx.dvc_s3())
        _end_journal(journal)
        if not target.exists() and state["owner_key"] != keep:
            owner_records.remove(ws, state["owner_key"])  # a first ingestion that never committed leaves no record
        undone.append(state["owner_key"])
    for leftover in ws.staging_dir.iterdir() if ws.staging_dir.exists() else []:
        if not leftover.name.startswith("journal-"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
    return undone
