"""Training tasks: the shard plan, and one task per shard (and the paragon, and the shared initialization)."""

from __future__ import annotations

import os
import socket
import time

# diffusers resolves its classes lazily, which is not thread-safe: resolve them here, before tasks run in threads.
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: F401
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cdm.data import Dataset
from cdm.platform.models import cleanup, gate, registry
from cdm.platform.workspace.context import Context
from cdm.platform.models.shards import load_plan, plan_shards, save_plan, train_and_register


@task(cache_policy=NO_CACHE)
def plan(ctx: Context) -> dict[str, list[str]]:
    """Shard id -> owners. Existing shards keep their owners; new owners are placed; owners under revocation are
    left out (their data stays until the purge, but no plan names them again)."""
    cleanup.sweep_dead_runs(ctx.client, ctx.backend, ctx.experiment_id)  # after a killed run
    with ctx.ws.lock():
        sizes = {o: len(ctx.ws.manifest(o)["samples"]) for o in gate.active_owners(ctx.ws)}
        new = plan_shards(ctx.ws, sizes, ctx.params.train.min_shard_samples, load_plan(ctx.ws))
        save_plan(ctx.ws, new)
    return new


def _on_worker(threads: int | None) -> dict:
    """Set up the process a training task runs in, and say where it is. `threads`: torch threads for this task
    (a Dask worker process gets its share of the cores). A local Dask cluster on a CUDA machine has one worker per
    GPU, named 0..n-1: each takes its own device (a worker started with CUDA_VISIBLE_DEVICES keeps it)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker
        worker = None
    if (worker is not None and torch.cuda.is_available() and "CUDA_VISIBLE_DEVICES" not in os.environ
            and str(worker.name).isdigit()):
        torch.cuda.set_device(int(worker.name) % torch.cuda.device_count())
    return {"worker": f"{socket.gethostname()}:{os.getpid()}", "started_at": time.time()}


@task(cache_policy=NO_CACHE, task_run_name="train-{shard_id}")
def train_shard(ctx: Context, shard_id: str, owners: list[str], progress: bool = False,
                threads: int | None = None) -> dict:
    """One shard: train (resuming from its last slice checkpoint) and register. Returns the summary of
    `train_and_register` plus the process it ran in and its wall-clock interval."""
    where = _on_worker(threads)
    info = train_and_register(ctx, registry.SHARD_PREFIX + shard_id, owners, progress=progress)
    get_run_logger().info("%s: %s", shard_id, "unchanged, skipped" if info["skipped"] else
                          f"version {info['version']} in {info['seconds']} s")
    return {**info, **where, "finished_at": time.time()}


@task(cache_policy=NO_CACHE)
def train_paragon(ctx: Context, owners: list[str], n_shards: int, progress: bool = False,
                  threads: int | None = None) -> dict:
    """The paragon: same architecture on all owners' data, as many steps as all shards together."""
    where = _on_worker(threads)
    info = train_and_register(ctx, registry.PARAGON, owners, steps=ctx.params.train.steps * n_shards,
                              checkpoints=False, progress=progress)
    return {**info, **where, "finished_at": time.time()}


@task(cache_policy=NO_CACHE)
def train_init(ctx: Context, data: Dataset, source: str, steps: int | None, progress: bool = False) -> dict:
    """The shared initialization on validated public data, registered as `cdm-init` (alias `current`)."""
    from cdm.platform.models.pretrain import train_and_register_init

    return train_and_register_init(ctx, data, source, steps, progress)


@task(cache_policy=NO_CACHE)
def train_text_base(ctx: Context, data, source: str, steps: int | None, progress: bool = False) -> dict:
    """A text workspace's shared base on validated public captioned data (a StableDiffusionPipeline folder),
    registered as `cdm-init` (alias `current`)."""
    from cdm.platform.models.pretrain import train_and_register_text_base

    return train_and_register_text_base(ctx, data, source, steps, progress)
