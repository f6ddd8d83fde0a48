"""Where a revocation's record lives and how each step writes its part of it (docs/design.md §5).

The record is `.cdm/revocations/<request_id>.json` (`request.Revocation`: one field per step); the needles the final
scan searches for lie beside it in `<request_id>.needles.json` (0600). A step module calls `recorded` with its own
logic: the output already recorded (a rerun after a crash skips what is done), or the logic's, written before it is
returned, so the next step never starts on an output that is not on disk. This module imports no step.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from cdm.platform.workspace.fileio import atomic_write
from cdm.platform.workspace.paths import Workspace

if TYPE_CHECKING:
    from cdm.platform.forgetting.request import Revocation

Output = TypeVar("Output")


def record_path(ws: Workspace, request_id: str) -> Path:
    return ws.revocations_dir / f"{request_id}.json"


def needles_path(ws: Workspace, request_id: str) -> Path:
    return ws.revocations_dir / f"{request_id}.needles.json"


def save(ws: Workspace, rev: Revocation) -> Revocation:
    atomic_write(record_path(ws, rev.request_id), rev.model_dump_json(indent=2))
    return rev


def recorded(ws: Workspace, rev: Revocation, step: str, run: Callable[[], Output]) -> Output:
    """The step's recorded output, or `run()`'s, recorded before it is returned."""
    done = getattr(rev, step)
    if done is not None:
        return done
    output = run()
    setattr(rev, step, output)
    save(ws, rev)
    return output


def runner_lock(ws: Workspace, request_id: str):
    """One process at a time works on a request (its steps are not meant to run twice at once). A file lock the
    kernel drops when its holder dies, kill -9 included."""
    from filelock import FileLock

    ws.revocations_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(ws.revocations_dir / f"{request_id}.lock", timeout=0, thread_local=False)


# Fault-injection points a test arms with CDM_FAULT=<point> (the process kills itself there with SIGKILL, as a
# crash would): one inside every step that writes, between its writes (tests/flows/test_faults.py).
def fault_point(name: str) -> None:
    if os.environ.get("CDM_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
