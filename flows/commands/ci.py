"""`cdm ci-report`: the evaluation as a CI job shows it (the job summary of `.github/workflows/evaluate.yml`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cdm.platform.workspace.errors import WorkspaceError
from flows.commands.common import _ctx


def metrics_diff(root: Path, base: str) -> str:
    """`dvc metrics diff BASE --md` as DVC prints it (an empty answer: nothing changed)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "metrics", "diff", base, "--md"], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"(no comparison with `{base}`: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'dvc failed'})"
    return proc.stdout.strip() or f"(no metric changed since `{base}`)"


def report(m: dict, diff: str, base: str, grid: str | None) -> str:
    """The evaluation's Markdown, `dvc metrics diff BASE` and where the sample grid is."""
    from cdm.platform.workspace.reports import evaluation_markdown

    text = evaluation_markdown(m) + f"\n### `dvc metrics diff {base}`\n\n{diff}\n"
    if grid:
        text += f"\nSample grid: `{grid}` (uploaded with the job's artifacts).\n"
    return text


def ci_report(workspace: str, base: str, out: str | None):
    ctx = _ctx(workspace)
    path = ctx.ws.root / "metrics.json"
    if not path.exists():
        raise WorkspaceError(f"{path} does not exist: run `dvc repro` (or `cdm evaluate --out metrics.json`) first")
    m = json.loads(path.read_text())
    grid = ctx.ws.root / "pipeline" / "samples.png"
    text = report(m, metrics_diff(ctx.ws.root, base), base, str(grid.relative_to(ctx.ws.root)) if grid.exists()
                  else None)
    if out:
        with open(out, "a") as f:  # $GITHUB_STEP_SUMMARY is appended to
            f.write(text)
    return {"regressions": m.get("regressions") or [], "markdown": text}, text
