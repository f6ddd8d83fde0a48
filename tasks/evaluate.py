"""Evaluation task: metrics of the production composite, logged to MLflow."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cdm.platform.workspace.context import Context
from cdm.platform.evaluation.evaluate import evaluate, log_evaluation


@task(cache_policy=NO_CACHE)
def evaluate_production(ctx: Context, alias: str = "production") -> dict:
    if ctx.params.data.conditioning == "text":
        from cdm.platform.evaluation.text_evaluate import evaluate_text

        metrics = evaluate_text(ctx, alias)
    else:
        from cdm.platform.forgetting.record import revoked_membership

        metrics = evaluate(ctx, alias, revoked=revoked_membership(ctx.ws))
    metrics["mlflow_run"] = log_evaluation(ctx, metrics)
    return metrics
