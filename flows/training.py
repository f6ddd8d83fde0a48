"""Training flow: the shard plan, then one task per shard on the configured task runner (+ the paragon)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from prefect import flow

from cdm.config import TrainParams
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.models.gate import NO_OWNERS, active_owners
from tasks.ingest import validate_batch
from tasks.train import plan, train_init, train_paragon, train_shard, train_text_base


@dataclass(frozen=True)
class Placement:
    """Where shard tasks run and what each asks for: the runner, the torch threads a task may use (None: leave the
    process's setting) and the Dask worker resources of one task."""
    runner: object
    threads: int | None = None
    resources: dict[str, float] | None = None

    def submit(self, task, *args):
        """`task.submit(*args)` with this placement's resources (a Dask annotation: the scheduler places the task
        on a worker that has them free)."""
        if not self.resources:
            return task.submit(*args)
        import dask

        with dask.annotate(resources=self.resources):
            return task.submit(*args)


def placement(t: TrainParams) -> Placement:
    """Threads of this process by default; `dask`: worker processes of a local cluster, or the cluster at
    `train.dask_address`. On a CUDA machine the local cluster has one worker per GPU, each offering a `GPU`
    resource, and each shard task asks for one."""
    import torch

    cores = os.cpu_count() or 1
    if t.task_runner != "dask":
        from prefect.task_runners import ThreadPoolTaskRunner

        workers = 1 if t.task_runner == "sequential" else t.max_workers
        return Placement(ThreadPoolTaskRunner(max_workers=workers))
    from prefect_dask import DaskTaskRunner

    cuda = torch.cuda.is_available()
    gpu = t.dask_gpu_per_task if t.dask_gpu_per_task is not None else cuda
    resources = {"GPU": 1} if gpu else None
    if t.dask_address:
        return Placement(DaskTaskRunner(address=t.dask_address), resources=resources)
    workers = torch.cuda.device_count() if gpu and cuda else t.max_workers
    return Placement(DaskTaskRunner(cluster_class="distributed.LocalCluster",
                                    cluster_kwargs=local_cluster(workers, resources)),
                     threads=max(1, cores // workers), resources=resources)


def local_cluster(workers: int, resources: dict | None) -> dict:
    """`LocalCluster` settings of a training run: worker processes on loopback that speak only mutual TLS with
    a certificate authority made for this cluster alone (`Security.temporary()`, in memory): the workers run
    with the workspace's MLflow and Prefect credentials, so a local user without the cluster's key must not be
    able to submit code to them (a plain `tcp://` scheduler accepts any client). No dashboard port either."""
    from distributed.security import Security

    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "resources": resources, "host": "127.0.0.1", "protocol": "tls://",
            "security": Security.temporary()}


@flow(name="cdm-train")
def train(workspace: str, owner_keys: list[str] | None = None, paragon: bool = False, progress: bool = False) -> dict:
    """Train every shard whose data or config changed (or only the shards of `owner_keys`), optionally the
    paragon. Owners are named by key: flow parameters are stored by Prefect."""
    ctx = Context.load(workspace)
    started = time.perf_counter()
    shard_plan = plan(ctx)
    if not shard_plan:
        raise WorkspaceError(NO_OWNERS)
    owners = active_owners(ctx.ws)
    by_key = {ctx.ws.owner_key(o): o for o in owners}
    unknown = sorted(set(owner_keys or []) - set(by_key))
    if unknown:
        raise WorkspaceError(f"unknown owner(s): {', '.join(unknown)}")
    chosen = {by_key[k] for k in owner_keys or []}
    selected = {s: o for s, o in shard_plan.items() if not owner_keys or set(o) & chosen}
    where = placement(ctx.params.train)
    futures = {s: where.submit(train_shard, ctx, s, o, progress, where.threads) for s, o in selected.items()}
    para_future = (where.submit(train_paragon, ctx, owners, len(shard_plan), progress, where.threads)
                   if paragon else None)
    results = {s: f.result() for s, f in futures.items()}
    para = para_future.result() if para_future is not None else None
    return {"shards": results, "paragon": para, "seconds": round(time.perf_counter() - started, 2)}


def run_training(ctx: Context, owner_keys: list[str] | None = None, paragon: bool = False,
                 progress: bool = False) -> dict:
    """Entry point: runs the flow on the configured task runner. Shards on threads split torch's threads between
    them so that they do not oversubscribe the cores; Dask worker processes set their own (`Placement.threads`)."""
    import torch

    t = ctx.params.train
    where = placement(t)
    threads = torch.get_num_threads()
    if t.task_runner == "threads":
        torch.set_num_threads(max(1, threads // t.max_workers))
    try:
        return train.with_options(task_runner=where.runner)(str(ctx.ws.root), owner_keys, paragon, progress)
    finally:
        torch.set_num_threads(threads)


@flow(name="cdm-pretrain")
def pretrain(workspace: str, source: str, steps: int | None = None, progress: bool = False) -> dict:
    """The shared initialization: validate public data (folder or s3://, the ingestion checks) and train on it.
    Nothing is copied into data/: the public samples are identified by the hashes logged with `cdm-init`."""
    from cdm.platform.data.ingest import read_source
    from cdm.platform.models.pretrain import public_dataset

    ctx = Context.load(workspace)
    files = read_source(ctx, source)
    validate_batch(ctx, "public", files)
    if ctx.params.data.conditioning == "text":
        from cdm.platform.models.pretrain import public_captioned

        return train_text_base(ctx, public_captioned(files, ctx.params), source, steps, progress)
    return train_init(ctx, public_dataset(files, ctx.params), source, steps, progress)
