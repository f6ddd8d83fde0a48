"""Evaluation flow (CI, `dvc repro`): metrics of the production composite, metrics.json, regression thresholds."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from cdm.platform.workspace.context import Context
from tasks.evaluate import evaluate_production


@flow(name="cdm-evaluate")
def evaluate(workspace: str, out: str | None = None, alias: str = "production") -> dict:
    """Evaluate production (or the composite `alias` names); the figures with their intervals stay on the flow
    run as a Markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    from cdm.platform.workspace.reports import evaluation_markdown

    metrics = evaluate_production(Context.load(workspace), alias)
    if out:
        Path(out).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if metrics.get("conditioning") == "text":
        from cdm.platform.evaluation.text_evaluate import text_evaluation_text

        markdown = "```\n" + text_evaluation_text(metrics) + "\n```"
    else:
        markdown = evaluation_markdown(metrics)
    create_markdown_artifact(markdown, key="cdm-evaluation",
                             description=f"composite v{metrics['composite_version']}: figures with 95% intervals")
    return metrics
