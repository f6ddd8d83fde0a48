"""Evaluation flow (CI, `dvc repro`): metrics of the production composite, metrics.json, regression thresholds."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from cdm.platform.context import Context
from tasks.evaluate import evaluate_production


@flow(name="cdm-evaluate")
def evaluate(workspace: str, out: str | None = None) -> dict:
    metrics = evaluate_production(Context.load(workspace))
    if out:
        Path(out).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
