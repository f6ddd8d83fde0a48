"""Composition task: register a composite version and move `production`."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cdm import registry
from cdm.composites import build_spec, register
from tasks.common import context


@task(cache_policy=NO_CACHE)
def compose(workspace: str, estimator: str | None = None) -> dict:
    ctx = context(workspace)
    registry.sweep_dead_runs(ctx.client, ctx.ws.tracking_uri, ctx.experiment_id)  # after a killed run
    spec = build_spec(ctx.ws, ctx.client, ctx.params, estimator or ctx.params.compose.estimator)
    return register(ctx.ws, ctx.client, ctx.experiment_id, ctx.params, spec)
