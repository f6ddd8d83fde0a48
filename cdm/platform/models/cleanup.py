"""Cleaning the registry: runs left by killed processes, and the hard purge of model versions (docs/design.md §4).

MLflow deletes softly; a purge deletes the runs and logged models, garbage-collects them with `mlflow gc` (rows and
artifacts, also on S3), removes the versions' tags and aliases, then deletes the versions.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from cdm.platform.models.registry import absent, model_id_of, pages, run_exists


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
