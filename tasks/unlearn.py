"""Unlearning tasks: one per step of `cdm.unlearn`, each resumable."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cdm import registry, unlearn
from tasks.common import context


@task(cache_policy=NO_CACHE, task_run_name="unlearn-{steps}")
def run_steps(workspace: str, owner_key: str, steps: tuple[str, ...]) -> dict:
    """Run the given steps in order (each skipped when already done)."""
    ctx = context(workspace)
    if "retrain" in steps:  # not before go_live: that step is about speed
        registry.sweep_dead_runs(ctx.client, ctx.ws.tracking_uri, ctx.experiment_id)
    state = unlearn.load_state(ctx.ws, owner_key)
    for step in steps:
        if step not in state["steps_done"]:
            state = run_step(ctx, state, step)
    return state


def run_step(ctx, state: dict, step: str) -> dict:
    if step == "plan":
        return unlearn.step_plan(ctx.ws, ctx.client, state)
    if step == "go_live":
        return unlearn.step_go_live(ctx.ws, ctx.client, ctx.experiment_id, ctx.params, state)
    if step == "retrain":
        return unlearn.step_retrain(ctx.ws, ctx.client, ctx.experiment_id, ctx.params, state)
    if step == "forgetting_check":
        return unlearn.step_forgetting_check(ctx.ws, ctx.client, ctx.params, state)
    if step == "purge":
        return unlearn.step_purge(ctx.ws, ctx.client, state)
    if step == "reevaluate":
        return unlearn.step_reevaluate(ctx.ws, ctx.client, ctx.params, state)
    if step == "certify":
        return unlearn.step_certify(ctx.ws, ctx.client, state)
    raise ValueError(f"unknown unlearning step {step!r}")
