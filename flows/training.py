"""Training flow: the shard plan, then one task per shard on the configured task runner (+ the paragon)."""

from __future__ import annotations

import time

from prefect import flow

from cdm.config import Params
from cdm.workspace import Workspace, WorkspaceError
from tasks.ingest import read_owner_source, validate_batch
from tasks.train import plan, train_init, train_paragon, train_shard


def task_runner(kind: str, workers: int):
    """Threads by default; Dask when asked for and installed (`pip install prefect-dask`)."""
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise WorkspaceError("task_runner 'dask' needs `pip install prefect-dask`") from None
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1 if kind == "sequential" else workers)


@flow(name="cdm-train")
def train(workspace: str, owners: list[str] | None = None, paragon: bool = False, progress: bool = False) -> dict:
    """Train every shard whose data or config changed (or only the shards of `owners`), optionally the paragon."""
    ws = Workspace(workspace).require()
    started = time.perf_counter()
    shard_plan = plan(workspace)
    if not shard_plan:
        raise WorkspaceError("no owners in the workspace; ingest data first")
    unknown = sorted(set(owners or []) - set(ws.owners()))
    if unknown:
        raise WorkspaceError(f"unknown owner(s): {', '.join(unknown)}")
    selected = {s: o for s, o in shard_plan.items() if not owners or set(o) & set(owners)}
    futures = {s: train_shard.submit(workspace, s, o, progress) for s, o in selected.items()}
    para_future = train_paragon.submit(workspace, ws.owners(), len(shard_plan), progress) if paragon else None
    results = {s: f.result() for s, f in futures.items()}
    para = para_future.result() if para_future is not None else None
    return {"shards": results, "paragon": para, "seconds": round(time.perf_counter() - started, 2)}


def run_training(workspace: str, owners: list[str] | None = None, paragon: bool = False,
                 progress: bool = False) -> dict:
    """Entry point: reads the task runner from params.yaml and runs the flow on it, with torch threads split
    between concurrent shards so that they do not oversubscribe the cores."""
    import torch

    params = Params.load(Workspace(workspace).require().params_path)
    t = params.train
    workers = 1 if t.task_runner == "sequential" else t.max_workers
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        return train.with_options(task_runner=task_runner(t.task_runner, workers))(workspace, owners, paragon,
                                                                                   progress)
    finally:
        torch.set_num_threads(threads)


@flow(name="cdm-pretrain")
def pretrain(workspace: str, source: str, steps: int | None = None, progress: bool = False) -> dict:
    """The shared initialization: validate public data (folder or s3://, the ingestion checks) and train on it.
    Nothing is copied into data/: the public samples are identified by the hashes logged with `cdm-init`."""
    ws = Workspace(workspace).require()
    params = Params.load(ws.params_path)
    files = read_owner_source(workspace, source, params.data.max_file_bytes)
    validate_batch(workspace, "public", files, params)
    return train_init(workspace, source, files, steps, progress)
