"""Evaluation task: metrics of the production composite, logged to MLflow."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cdm.evaluate import evaluate, log_evaluation
from tasks.common import context


@task(cache_policy=NO_CACHE)
def evaluate_production(workspace: str) -> dict:
    ctx = context(workspace)
    metrics = evaluate(ctx.ws, ctx.client, ctx.params)
    metrics["mlflow_run"] = log_evaluation(ctx.client, ctx.ws, metrics)
    return metrics
