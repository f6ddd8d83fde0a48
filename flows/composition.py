"""Composition flow: register a composite of the latest shard versions and make it `production`."""

from __future__ import annotations

from typing import Literal

from prefect import flow

from cdm.platform.workspace.context import Context
from tasks.compose import compose as compose_task


@flow(name="cdm-compose")
def compose(workspace: str, estimator: Literal["path", "router", "prior", "average"] | None = None,
            progress: bool = False, candidate: bool = False) -> dict:
    return compose_task(Context.load(workspace), estimator, progress, candidate)
