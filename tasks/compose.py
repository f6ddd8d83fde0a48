"""Composition task: register a composite version and move `production`."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cdm.platform.models import cleanup
from cdm.platform.models.composites import build_spec, register
from cdm.platform.workspace.context import Context


@task(cache_policy=NO_CACHE)
def compose(ctx: Context, estimator: str | None = None, progress: bool = False, candidate: bool = False) -> dict:
    cleanup.sweep_dead_runs(ctx.client, ctx.backend, ctx.experiment_id)  # after a killed run
    spec = build_spec(ctx, estimator or ctx.params.compose.estimator)
    return register(ctx, spec, progress=progress, candidate=candidate)
