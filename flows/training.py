"""Training flow: the shard plan, then one task per shard on the configured task runner (+ the paragon)."""

from __future__ import annotations

import time

from prefect import flow

from cdm.platform.context import Context
from cdm.platform.errors import WorkspaceError
from tasks.ingest import validate_batch
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
def train(workspace: str, owner_keys: list[str] | None = None, paragon: bool = False, progress: bool = False) -> dict:
    """Train every shard whose data or config changed (or only the shards of `owner_keys`), optionally the
    paragon. Owners are named by key: flow parameters are stored by Prefect."""
    ctx = Context.load(workspace)
    started = time.perf_counter()
    shard_plan = plan(ctx)
    if not shard_plan:
        raise WorkspaceError("no owners in the workspace; ingest data first")
    by_key = {ctx.ws.owner_key(o): o for o in ctx.ws.owners()}
    unknown = sorted(set(owner_keys or []) - set(by_key))
    if unknown:
        raise WorkspaceError(f"unknown owner(s): {', '.join(unknown)}")
    chosen = {by_key[k] for k in owner_keys or []}
    selected = {s: o for s, o in shard_plan.items() if not owner_keys or set(o) & chosen}
    futures = {s: train_shard.submit(ctx, s, o, progress) for s, o in selected.items()}
    para_future = train_paragon.submit(ctx, ctx.ws.owners(), len(shard_plan), progress) if paragon else None
    results = {s: f.result() for s, f in futures.items()}
    para = para_future.result() if para_future is not None else None
    return {"shards": results, "paragon": para, "seconds": round(time.perf_counter() - started, 2)}


def run_training(ctx: Context, owner_keys: list[str] | None = None, paragon: bool = False,
                 progress: bool = False) -> dict:
    """Entry point: runs the flow on the configured task runner, with torch threads split between concurrent
    shards so that they do not oversubscribe the cores."""
    import torch

    t = ctx.params.train
    workers = 1 if t.task_runner == "sequential" else t.max_workers
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        return train.with_options(task_runner=task_runner(t.task_runner, workers))(
            str(ctx.ws.root), owner_keys, paragon, progress)
    finally:
        torch.set_num_threads(threads)


@flow(name="cdm-pretrain")
def pretrain(workspace: str, source: str, steps: int | None = None, progress: bool = False) -> dict:
    """The shared initialization: validate public data (folder or s3://, the ingestion checks) and train on it.
    Nothing is copied into data/: the public samples are identified by the hashes logged with `cdm-init`."""
    from cdm.platform.ingest import read_source
    from cdm.platform.pretrain import public_dataset

    ctx = Context.load(workspace)
    files = read_source(ctx, source)
    validate_batch(ctx, "public", files)
    return train_init(ctx, public_dataset(files, ctx.params), source, steps, progress)
