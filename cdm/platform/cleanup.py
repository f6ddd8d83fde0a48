"""Cleaning the registry: runs left by killed processes, and the hard purge of model versions (docs/design.md §4);
and Prefect log lines that name a revoked owner.

MLflow deletes softly; a purge deletes the runs and logged models, garbage-collects them with `mlflow gc` (rows and
artifacts, also on S3), removes the versions' tags and aliases, then deletes the versions.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from cdm.platform.registry import absent, model_id_of, pages, run_exists


@dataclass(frozen=True)
class Backend:
    """Where `mlflow gc` deletes rows: the backend store's URI (no secret in it) and the environment it needs
    (a PostgreSQL password; the tracking server that resolves proxied artifact URIs)."""
    uri: str
    env: dict[str, str] = field(default_factory=dict)


def sweep_dead_runs(c, backend: Backend, exp_id: str) -> list[str]:
    """Clean up after a cdm process killed while logging (kill -9, OOM, power loss).

    A run still RUNNING whose process (tags `cdm.host`, `cdm.pid`) is gone on this host is ended as KILLED. If it
    registered no model version, nothing refers to it: the run and its logged models are deleted and
    garbage-collected with their artifacts. (A version is created together with its tags, so one that exists is
    complete and its run stays.) Returns the ids of the runs deleted.
    """
    from mlflow.entities import RunStatus

    host, swept = socket.gethostname(), []
    running = pages(lambda token: c.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'",
                                                page_token=token))
    for run in list(running):
        tags = run.data.tags
        if tags.get("cdm.host") != host or not tags.get("cdm.pid") or process_alive(int(tags["cdm.pid"])):
            continue
        rid = run.info.run_id
        c.set_terminated(rid, RunStatus.to_string(RunStatus.KILLED))
        if c.search_model_versions(f"run_id = '{rid}'"):
            continue
        discard_run(c, backend, exp_id, rid)
        swept.append(rid)
    return swept


def discard_run(c, backend: Backend, exp_id: str, run_id: str) -> None:
    """Delete a run that registered nothing (killed, or refused by the gate) with its logged models, rows and
    artifacts."""
    models = [m.model_id for m in pages(lambda token: c.search_logged_models(
        [exp_id], filter_string=f"source_run_id = '{run_id}'", page_token=token))]
    for mid in models:
        c.delete_logged_model(mid)
    c.delete_run(run_id)
    gc(backend, [run_id], models)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def purge(c, backend: Backend, versions_to_delete: list[tuple[str, str]], registered_to_delete: list[str],
          extra_runs: list[str] = ()) -> dict:
    """Hard-delete model versions: their runs (and `extra_runs`, e.g. training runs that registered nothing) and
    logged models are deleted and garbage-collected (`mlflow gc`, which also empties their artifact folders), then
    the versions (and whole registered models) are deleted.

    Returns:
        {"versions": [...], "runs": [...], "logged_models": [...], "registered_models": [...]}.
    """
    from mlflow.exceptions import MlflowException

    runs, models = set(extra_runs), set()
    for rid in extra_runs:
        models |= {m.model_id for m in c.search_logged_models(
            [c.get_run(rid).info.experiment_id], filter_string=f"source_run_id = '{rid}'")} if run_exists(c, rid) else set()
    for name, version in versions_to_delete:
        try:
            mv = c.get_model_version(name, version)
        except MlflowException as e:
            if not absent(e):
                raise  # an outage: a purge that skipped what it could not read would certify it gone
            continue
        if mv.run_id:
            runs.add(mv.run_id)
        mid = model_id_of(c, name, version)
        if mid:
            models.add(mid)
    for mid in sorted(models):
        try:
            c.delete_logged_model(mid)
        except MlflowException as e:
            if not absent(e):  # gone already (a rerun after a crash); anything else is a failed purge
                raise
    runs = {rid for rid in runs if run_exists(c, rid)}  # a rerun after a crash: gc'd runs are gone
    for rid in sorted(runs):
        try:
            c.delete_run(rid)
        except MlflowException as e:
            if not absent(e):  # gone already (a rerun after a crash); anything else is a failed purge
                raise
    if runs or models:
        gc(backend, sorted(runs), sorted(models))
    # Deleting a version is soft in MLflow: its row and tags stay. Remove tags and aliases first.
    for name, version in versions_to_delete:
        try:
            mv = c.get_model_version(name, version)
            for alias in mv.aliases:
                c.delete_registered_model_alias(name, alias)
            for key in mv.tags:
                c.delete_model_version_tag(name, version, key)
            c.delete_model_version(name, version)
        except MlflowException as e:
            if not absent(e):  # gone already (a rerun after a crash); anything else is a failed purge
                raise
    for name in registered_to_delete:
        try:
            for key in c.get_registered_model(name).tags:
                c.delete_registered_model_tag(name, key)
            c.delete_registered_model(name)
        except MlflowException as e:
            if not absent(e):  # gone already (a rerun after a crash); anything else is a failed purge
                raise
    return {"versions": [f"{n}/{v}" for n, v in versions_to_delete], "runs": sorted(runs),
            "logged_models": sorted(models), "registered_models": list(registered_to_delete)}


def gc(backend: Backend, run_ids: list[str], model_ids: list[str]) -> None:
    """`mlflow gc` for the given deleted runs and logged models (deletes their rows and artifacts)."""
    args = [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", backend.uri]
    if run_ids:
        args += ["--run-ids", ",".join(run_ids)]
    if model_ids:
        args += ["--logged-model-ids", ",".join(model_ids)]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **backend.env})
    if proc.returncode != 0:
        raise RuntimeError(f"mlflow gc failed: {proc.stderr.strip()[-2000:]}")


def purge_prefect_logs(db, owner: str, key: str, others: tuple[str, ...] = ()) -> int:
    """Take `owner`'s raw id out of Prefect's SQLite database `db`: log lines naming them are deleted, run state
    messages and event payloads naming them have it replaced by `key` (matched as the trace scan matches a database: the id's usual
    cases, not inside another remaining owner's id); then, whenever the file still holds the id anywhere (free
    pages, the write-ahead log), it is rewritten (VACUUM) and checkpointed. Run logs are redacted before they reach
    Prefect; this removes what reached it another way (an older version, a library's own message). Raises OSError
    when another connection keeps the checkpoint from completing (the purge retries). Returns the rows changed."""
    import re
    import sqlite3

    from cdm.platform.scan import Needles

    needle = Needles(owner, others=others)
    cases = re.compile("|".join(re.escape(c) for c in sorted({owner, owner.upper(), owner.title()}, key=len)[::-1]))
    con = sqlite3.connect(str(db), timeout=60)
    changed = 0
    try:
        con.execute("PRAGMA secure_delete = ON")  # what is deleted is zeroed, not left in free pages
        # Log lines go; state messages and events (a state change's event and its resources repeat its
        # message) keep the key.
        for table, column, action in (("log", "message", "delete"), ("flow_run_state", "message", "redact"),
                                      ("task_run_state", "message", "redact"), ("events", "resource", "redact"),
                                      ("events", "payload", "redact"), ("events", "related", "redact"),
                                      ("event_resources", "resource", "redact")):
            try:
                rows = con.execute(f"SELECT id, {column} FROM {table} WHERE {column} LIKE ?",
                                   (f"%{owner}%",)).fetchall()
            except sqlite3.OperationalError:  # a Prefect version without that table
                continue
            hits = [(rid, m) for rid, m in rows if m and needle.find(str(m).encode(), binary=False, database=True)]
            if action == "delete":
                con.executemany(f"DELETE FROM {table} WHERE id = ?", [(rid,) for rid, _ in hits])
            else:
                con.executemany(f"UPDATE {table} SET {column} = ? WHERE id = ?",
                                [(cases.sub(key, str(m)), rid) for rid, m in hits])
            changed += len(hits)
        con.commit()
        if changed or _mentions(db, needle):
            con.execute("VACUUM")
            busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                raise OSError(f"Prefect's database {db} is busy: its checkpoint did not complete")
    finally:
        con.close()
    return changed


def _mentions(db, needle) -> bool:
    """Whether the database file or its write-ahead log holds the raw id (as the scan would find it)."""
    from pathlib import Path

    for part in (Path(db), Path(f"{db}-wal")):
        if part.is_file() and needle.find(part.read_bytes(), binary=False, database=True):
            return True
    return False
