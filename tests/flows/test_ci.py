"""The CI workflow's steps in order on a small workspace (`.github/workflows/evaluate.yml`): `dvc repro` runs the
train, compose and evaluate stages on a *candidate* composite, and `cdm promote --candidate` serves it once its
evaluation passed; unchanged, every stage is skipped; a params change re-runs only what depends on it and
`dvc metrics diff` shows what it did; shards left untrained fail the job with the regression named, and production
stays what it was.

Slow (each stage is a `cdm` process): `make test-slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdm.config import Params
from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.platform.create import init_workspace
from cdm.platform.workspace.gitrepo import commit

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def step(ws: Path, *args: str) -> subprocess.CompletedProcess:
    """One workflow step as the runner runs it: in the workspace, `cdm` and `dvc` on the PATH."""
    from prefect.settings import PREFECT_API_URL

    # `cdm` talks to this session's Prefect API (the test harness) instead of starting one.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    return subprocess.run(list(args), cwd=ws, env=env, capture_output=True, text=True, timeout=1200)


def set_params(ws: Path, **changes: dict) -> None:
    p = Params.load(ws / "params.yaml")
    for group, values in changes.items():
        for k, v in values.items():
            setattr(getattr(p, group), k, v)
    p.dump(ws / "params.yaml")


def test_the_ci_workflow_skips_reruns_with_a_diff_and_fails_on_a_regression(tmp_path, small_params, digit_owners):
    from flows.ingestion import ingest

    p = small_params()
    p.evaluate.sets = 4
    p.evaluate.fid_ratio_max = 50.0  # 40-step shards against a 40-step paragon: the gate here is fid_max (below)
    ws = init_workspace(tmp_path / "ws", params=p)
    sources = digit_owners(tmp_path / "sources")
    for owner in ("alice", "dave"):
        ingest(Context.load(ws.root), owner, str(sources[owner]))
    root = ws.root

    first = step(root, "dvc", "repro")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["regressions"] == [] and metrics["composite_alias"] == "candidate"
    assert metrics["paragon_version"] is not None and metrics["fid_ratio"] is not None  # the stage trains it
    assert sorted(p.name for p in (root / "pipeline" / "train_loss").iterdir()) and (root / "pipeline" /
                                                                                   "samples.png").exists()
    c = registry.client(ws.tracking_uri())
    assert registry.alias_version(c, registry.COMPOSITE) is None  # evaluated, not served
    promoted = step(root, "cdm", "promote", "--candidate", "--workspace", ".")
    assert promoted.returncode == 0, promoted.stderr
    assert str(registry.alias_version(c, registry.COMPOSITE).version) == str(metrics["composite_version"])
    commit(root, "ci: first evaluation", "dvc.lock", "metrics.json", "pipeline", "params.yaml")
    assert "samples.png" not in step(root, "git", "ls-files", "pipeline").stdout  # generated images stay out of git

    # Unchanged: every stage is skipped.
    again = step(root, "dvc", "repro")
    assert again.returncode == 0
    for stage in ("train", "compose", "evaluate"):
        assert f"'{stage}' didn't change, skipping" in again.stdout, again.stdout

    # A params change re-runs what depends on it (compose and evaluate, not train); the diff shows the figures.
    set_params(root, compose={"num_inference_steps": 20})
    rerun = step(root, "dvc", "repro")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "'train' didn't change, skipping" in rerun.stdout
    assert "Running stage 'compose'" in rerun.stdout and "Running stage 'evaluate'" in rerun.stdout
    diff = json.loads(step(root, "dvc", "metrics", "diff", "HEAD", "--json").stdout)
    assert "fid" in diff["metrics.json"] and "composite_version" in diff["metrics.json"]
    plots = step(root, "dvc", "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    drawn = json.loads(plots.stdout)["data"]  # the two interval plots and one loss curve per shard
    assert {"fid", "nll"} <= set(drawn) and any("train_loss" in k for k in drawn), sorted(drawn)
    assert len((root / "pipeline" / "evaluations.csv").read_text().strip().splitlines()) == 3  # header + 2 versions
    report = step(root, "cdm", "ci-report", "--workspace", ".", "--base", "HEAD", "--out", str(tmp_path / "sum.md"))
    assert report.returncode == 0 and "dvc metrics diff HEAD" in report.stdout and "| fid" in report.stdout
    good = json.loads((root / "metrics.json").read_text())

    assert step(root, "cdm", "promote", "--candidate", "--workspace", ".").returncode == 0
    served = str(registry.alias_version(c, registry.COMPOSITE).version)

    # Shards left almost untrained: the job fails, says why, and nothing is served from it.
    set_params(root, train={"steps": 2}, evaluate={"fid_max": round(good["fid_ci"][1], 3)})
    failed = step(root, "dvc", "repro")
    assert failed.returncode != 0
    bad = json.loads((root / "metrics.json").read_text())
    assert bad["regressions"] and bad["regressions"][0].startswith("fid ")
    assert "regression" in failed.stderr and "fid" in failed.stderr
    report = step(root, "cdm", "ci-report", "--workspace", ".", "--base", "HEAD")
    assert "**FAILED**" in report.stdout and bad["regressions"][0] in report.stdout
    refused = step(root, "cdm", "promote", "--candidate", "--workspace", ".")
    assert refused.returncode == 2 and "failed its evaluation" in refused.stderr
    assert str(registry.alias_version(c, registry.COMPOSITE).version) == served
    assert yaml.safe_load((root / "dvc.yaml").read_text())["stages"].keys() == {"train", "compose", "evaluate"}
