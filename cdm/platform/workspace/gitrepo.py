"""git, as the workspace uses it: small commits of tracked files (data.dvc, ledger.jsonl, configuration)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git(root: str | Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", "-c", "user.name=cdm", "-c", "user.email=cdm@localhost", *args], cwd=root,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def commit(root: str | Path, message: str, *paths: str) -> None:
    """Stage `paths` and commit them (an empty commit when nothing changed: every event leaves a commit)."""
    git(root, "add", *paths)
    git(root, "commit", "-q", "-m", message, "--allow-empty")
