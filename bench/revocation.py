"""Revocation latency on the demo's workspace: how long `cdm revoke` takes to return with the owner out of
production, how long the background purge takes, and the paragon retrain it is compared with — one run, one
machine, every figure from the same workspace.

    python bench/revocation.py [--out bench/revocation.json] [--owners 4] [--steps 500]

Setup (not timed): the demo's quick settings — digits split iid over `--owners` owners, shards of `--steps` steps,
the paragon, a composite in production. Then, timed:
  1. `cdm revoke owner-01 --token ...` as a user runs it (a new process): wall time until it returns;
  2. the background process finishing the revocation: purge seconds (the purge step alone) and the whole revocation;
  3. `cdm train --paragon` (a new process): the paragon retrained without the owner — the baseline.
Writes the figures, the machine and the versions to `--out` (JSON) and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CDM = [sys.executable, "-m", "flows.cli"]


def cdm(*args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([*CDM, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "revocation.json"))
    ap.add_argument("--owners", type=int, default=4)
    ap.add_argument("--steps", type=int, default=500, help="training steps per shard (the demo's quick preset)")
    args = ap.parse_args()

    from flows.cli import env_defaults

    env_defaults()
    from cdm.data import write_demo_owners
    from cdm.platform.create import init_workspace
    from flows.demo import demo_params

    tmp = Path(tempfile.mkdtemp(prefix="cdm-bench-revocation-"))
    ws_dir = tmp / "ws"
    params = demo_params(quick=True)
    params.train.steps = args.steps
    sources = write_demo_owners(tmp / "sources", args.owners, "iid")
    init_workspace(ws_dir, params=params)
    tokens = {}
    for owner in sorted(o for o in sources if o != "heldout"):
        proc, _ = cdm("ingest", owner, str(sources[owner]), "--workspace", str(ws_dir), "--json")
        assert proc.returncode == 0, proc.stderr
        tokens[owner] = json.loads(proc.stdout)["token"]
    for step in (("train", "--paragon"), ("compose",)):
        proc, _ = cdm(*step, "--workspace", str(ws_dir))
        assert proc.returncode == 0, proc.stderr

    victim = "owner-01"
    proc, revoke_wall = cdm("revoke", victim, "--token", tokens[victim], "--workspace", str(ws_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    live = json.loads(proc.stdout)
    request = live["request_id"]
    record = ws_dir / ".cdm" / "revocations" / f"{request}.json"
    deadline = time.time() + 1800
    while time.time() < deadline:
        state = json.loads(record.read_text())
        if state.get("completed"):
            break
        time.sleep(2)
    cert = state["certify"]
    proc, paragon_wall = cdm("train", "--paragon", "--workspace", str(ws_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    paragon = json.loads(proc.stdout)["paragon"]
    result = {
        "command": " ".join(sys.argv), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "owners": args.owners, "steps_per_shard": args.steps,
        "revoke_command_wall_seconds": round(revoke_wall, 2),
        "seconds_to_live": live["live"]["seconds_to_live"],
        "purge_seconds": cert["purged"]["seconds"],
        "revocation_complete_seconds": cert["seconds_to_complete"],
        "verification_ok": cert["verification"]["ok"],
        "stores_scanned": cert["verification"]["scan"]["scanned"],
        "paragon_retrain_command_wall_seconds": round(paragon_wall, 2),
        "paragon_train_seconds": paragon["seconds"],
        "purge_vs_paragon_train": round(paragon["seconds"] / cert["purged"]["seconds"], 2),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
