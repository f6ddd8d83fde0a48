"""Revocation latency on the demo's workspace: how long `cdm revoke` takes to return with the owner out of
production, how long the background purge takes, and the paragon retrain it is compared with — one run, one
machine, every figure from the same workspace.

    python bench/revocation.py [--out bench/revocation.json] [--owners 4] [--steps 500]

Setup (not timed): the demo's quick settings — digits split iid over `--owners` owners, shards of `--steps` steps,
the paragon, a composite in production, and a serving process that loaded `models:/cdm-composite@production` and
answers one-sample requests in a loop, stamping each response. Then, timed:
  1. `cdm revoke owner-01` as a user runs it (a new process, the token on stdin): wall time until it returns, and
     its seconds from acceptance to production without the owner;
  2. the already-running server: seconds from `cdm revoke` returning (and from the request's acceptance) to the
     first response of that server that excludes the owner's shards (it was never restarted);
  3. the background process finishing the revocation: purge seconds (the purge step alone) and the whole revocation;
  4. `cdm train --paragon` (a new process): the paragon retrained without the owner — the baseline.
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


# A serving process as a team runs one: the registered pyfunc loaded once, then requests answered in a loop; each
# response is stamped (end time) with the shards it used.
SERVER = """
import json, sys, time, mlflow
model = mlflow.pyfunc.load_model("models:/cdm-composite@production")
out = open(sys.argv[1], "a")
i = 0
while True:
    t0 = time.time()
    try:
        r = model.predict({"n": 1, "seed": i})
        row = {"start": t0, "end": time.time(), "shards": r["shards"]}
    except Exception as e:
        row = {"start": t0, "end": time.time(), "error": str(e)[:200]}
    out.write(json.dumps(row) + "\\n"); out.flush()
    i += 1
"""


def start_server(ws_dir: Path, responses: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ws_dir}/mlflow/mlflow.db"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(responses)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (responses.exists() and responses.read_text().count("\n") >= 3):
        time.sleep(0.5)  # loaded and answering (the first requests fetch the shards)
    return proc


def wait_for_exclusion(responses: Path, victim_shards: set[str], accepted: float, returned: float) -> dict:
    """The first response of the running server that ended after the revocation was accepted (its marks and owner
    record written) and used none of the victim's shards; and whether any response ending after acceptance still
    used one."""
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = [json.loads(line) for line in responses.read_text().splitlines() if line.strip()]
        after = [r for r in rows if r["end"] > accepted]
        leaked = [r for r in after if set(r.get("shards", [])) & victim_shards]
        clean = [r for r in after if "shards" in r and not set(r["shards"]) & victim_shards]
        if clean and clean[-1]["end"] > returned:
            first = clean[0]
            return {"requests_before_revocation": len(rows) - len(after),
                    "seconds_from_acceptance_to_first_response_without_owner": round(first["end"] - accepted, 3),
                    "seconds_from_revoke_return_to_first_response_without_owner":
                        round(max(0.0, first["end"] - returned), 3),
                    "responses_after_acceptance_that_used_the_owner": len(leaked),
                    "request_seconds_median": sorted(r["end"] - r["start"] for r in rows)[len(rows) // 2]}
        time.sleep(0.2)
    raise RuntimeError("the running server never answered without the owner's shards")


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
    victim_shards = {s for s, owners in json.loads((ws_dir / ".cdm" / "shards.json").read_text()).items()
                     if owners == [victim]}
    server = start_server(ws_dir, tmp / "responses.jsonl")
    t0 = time.perf_counter()
    proc = subprocess.run([*CDM, "revoke", victim, "--token-stdin", "--workspace", str(ws_dir), "--json"],
                          input=tokens[victim] + "\n", capture_output=True, text=True, timeout=1800, cwd=ROOT)
    revoke_wall, returned = time.perf_counter() - t0, time.time()
    assert proc.returncode == 0, proc.stderr
    live = json.loads(proc.stdout)
    request = live["request_id"]
    record = ws_dir / ".cdm" / "revocations" / f"{request}.json"
    accepted = json.loads(record.read_text())["accepted_ts"]
    serving = wait_for_exclusion(tmp / "responses.jsonl", victim_shards, accepted, returned)
    server.kill()
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
        "running_server": serving,
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
