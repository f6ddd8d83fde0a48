"""Training tasks: the shard plan, and one task per shard (and the paragon)."""

from __future__ import annotations

# diffusers resolves its classes lazily, which is not thread-safe: resolve them here, before tasks run in threads.
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: F401
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cdm import registry
from cdm.shards import load_plan, plan_shards, save_plan, train_and_register
from tasks.common import context


@task(cache_policy=NO_CACHE)
def plan(workspace: str) -> dict[str, list[str]]:
    ctx = context(workspace)
    registry.sweep_dead_runs(ctx.client, ctx.ws.tracking_uri, ctx.experiment_id)  # after a killed run
    with ctx.ws.lock():
        sizes = {o: len(ctx.ws.manifest(o)["samples"]) for o in ctx.ws.owners()}
        new = plan_shards(ctx.ws, sizes, ctx.params.train.min_shard_samples, load_plan(ctx.ws))
        save_plan(ctx.ws, new)
    return new


@task(cache_policy=NO_CACHE, task_run_name="train-{shard_id}")
def train_shard(workspace: str, shard_id: str, owners: list[str], progress: bool = False) -> dict:
    ctx = context(workspace)
    info = train_and_register(ctx.ws, ctx.client, ctx.experiment_id, registry.SHARD_PREFIX + shard_id, owners,
                              ctx.params, progress=progress)
    get_run_logger().info("%s: %s", shard_id, "unchanged, skipped" if info["skipped"] else
                          f"version {info['version']} in {info['seconds']} s")
    return info


@task(cache_policy=NO_CACHE)
def train_paragon(workspace: str, owners: list[str], n_shards: int, progress: bool = False) -> dict:
    """The paragon: same architecture on all owners' data, as many steps as all shards together."""
    ctx = context(workspace)
    return train_and_register(ctx.ws, ctx.client, ctx.experiment_id, registry.PARAGON, owners, ctx.params,
                              steps=ctx.params.train.steps * n_shards, checkpoints=False, progress=progress)


@task(cache_policy=NO_CACHE)
def train_init(workspace: str, source: str, files: list, steps: int | None, progress: bool = False) -> dict:
    """The shared initialization on validated public files, registered as `cdm-init`."""
    from cdm.pretrain import public_dataset, train_and_register_init

    ctx = context(workspace)
    data = public_dataset(files, ctx.params)
    return train_and_register_init(ctx.ws, ctx.client, ctx.experiment_id, data, ctx.params, source, steps, progress)
