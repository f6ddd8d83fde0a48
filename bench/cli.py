"""How long `cdm` commands take as a user meets them: each a new process on the embedded default (SQLite, the
workspace's own Prefect API), median of 5 runs beside the floor `python -c "import cdm"`. Writes bench/cli.json.

    python bench/cli.py [--runs 5] [--out bench/cli.json]      (= make bench-cli; ~5 min on 2 cores)

Goals (issue #30, quiet 2-core machine): `cdm status` <= 1.5 s; a 30-image `cdm ingest` <= 4 s; `cdm revoke` to
acceptance (the command returns once the owner is out of serving; the purge goes on in the background) <= 2 s;
`cdm sample --n 16` <= 4 s. The first flow command of a workspace also starts its Prefect API: measured apart
(`first_flow_command`). Between two timed runs the background revocation is waited for, untimed, so it does not
share the cores with the next run. Each command's import time is measured with `python -X importtime` (the heavy
libraries it loads, and their seconds) to say where the rest goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOALS = {"status": 1.5, "ingest": 4.0, "revoke": 2.0, "sample": 4.0}
HEAVY = ("torch", "mlflow", "prefect", "great_expectations", "diffusers", "transformers", "dvc.repo", "pandas",
         "sqlalchemy", "boto3", "scipy", "sklearn", "peft", "dask", "distributed")
CDM = [str(Path(sys.executable).with_name("cdm"))]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API") and k != "CDM_PREFECT_API"}
    e["CDM_PREFECT_IDLE_SECONDS"] = "900"  # stays up through the whole measurement
    return e


def timed(cmd: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return seconds, proc


def imports(cmd: list[str], cwd: Path) -> dict[str, float]:
    """Seconds of cumulative import time of each heavy library the command loads (python -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.cli", *cmd[1:]], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=900)
    out = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)$", line)
        if m and m.group(3) in HEAVY and m.group(3) not in out:
            out[m.group(3)] = round(int(m.group(1)) / 1e6, 2)
    return out


def summary(runs: list[float], goal: float | None = None) -> dict:
    d = {"median_s": round(statistics.median(runs), 2), "runs_s": [round(r, 2) for r in runs]}
    if goal is not None:
        d.update(goal_s=goal, met=d["median_s"] <= goal)
    return d


def wait_revocations(root: Path, timeout: float = 600) -> None:
    """Until no revocation is in progress (the background purge of the last `cdm revoke`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, proc = timed([*CDM, "status", "--json", "--workspace", str(root)], root)
        if not json.loads(proc.stdout)["revocations_in_progress"]:
            return
        time.sleep(2)
    raise RuntimeError("a background revocation did not finish")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--images", type=int, default=30, help="images per owner batch")
    ap.add_argument("--out", default=str(Path(__file__).with_name("cli.json")))
    args = ap.parse_args()

    from cdm.data import digits_uint8, write_class_folders

    tmp = Path(tempfile.mkdtemp(prefix="cdm-bench-cli-"))
    root = tmp / "ws"
    x, y = digits_uint8()
    n_owners = 3 + 2 * args.runs  # 3 to start with, then one per timed ingest and one per timed revocation
    sources = []
    for i in range(n_owners):
        src = tmp / f"owner{i}"
        write_class_folders(x[i * args.images:(i + 1) * args.images], y[i * args.images:(i + 1) * args.images], src)
        sources.append(src)
    ws = ["--workspace", str(root)]
    results: dict = {"command": "python bench/cli.py " + " ".join(sys.argv[1:]),
                     "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "setting": "each command a new process; embedded default (SQLite MLflow store, the workspace's "
                                "Prefect API started by the first flow command and reused); median of the runs",
                     "commands": {}}
    try:
        floor = [timed([sys.executable, "-c", "import cdm"], tmp)[0] for _ in range(args.runs)]
        results["floor_import_cdm"] = summary(floor)
        results["help"] = summary([timed([*CDM, "--help"], tmp)[0] for _ in range(args.runs)])
        timed([*CDM, "init", str(root)], tmp)
        # The first flow command of the workspace: it starts the Prefect API (and Prefect creates its database).
        first, _ = timed([*CDM, "ingest", "owner0", str(sources[0]), *ws], tmp)
        results["first_flow_command"] = {"ingest_s": round(first, 2),
                                         "note": "includes starting the workspace's Prefect API and creating its "
                                                 "database; later flow commands reuse it"}
        for i in (1, 2):
            timed([*CDM, "ingest", f"owner{i}", str(sources[i]), *ws], tmp)
        params = root / "params.yaml"  # short training: sampling costs the same whatever the weights
        params.write_text(re.sub(r"(\n  steps:) \d+", r"\1 60", params.read_text(), count=1))
        timed([*CDM, "train", *ws], tmp)
        timed([*CDM, "compose", *ws], tmp)
        c = results["commands"]
        c["status"] = summary([timed([*CDM, "status", *ws], tmp)[0] for _ in range(args.runs)], GOALS["status"])
        c["status"]["owners"] = 3
        c["ingest"] = summary([timed([*CDM, "ingest", f"owner{3 + k}", str(sources[3 + k]), *ws], tmp)[0]
                               for k in range(args.runs)], GOALS["ingest"])
        c["ingest"]["images"] = args.images
        c["sample"] = summary([timed([*CDM, "sample", "--n", "16", "--out", str(tmp / "grid.png"), *ws], tmp)[0]
                               for _ in range(args.runs)], GOALS["sample"])
        revokes = []
        for k in range(args.runs):
            s, _ = timed([*CDM, "revoke", f"owner{3 + k}", *ws], tmp)
            revokes.append(s)
            wait_revocations(root)
        c["revoke"] = summary(revokes, GOALS["revoke"])
        c["revoke"]["note"] = "to acceptance: the command returns once the owner is out of serving"
        o = f"owner{3 + args.runs}"
        timed([*CDM, "ingest", o, str(sources[3 + args.runs]), *ws], tmp)
        results["imports_s"] = {
            "status": imports([*CDM, "status", *ws], tmp),
            "ingest": imports([*CDM, "ingest", f"owner{4 + args.runs}", str(sources[4 + args.runs]), *ws], tmp),
            "sample": imports([*CDM, "sample", "--n", "16", "--out", str(tmp / "grid.png"), *ws], tmp),
            "revoke": imports([*CDM, "revoke", o, *ws], tmp)}
        wait_revocations(root)
        results["goals_met"] = {k: v["met"] for k, v in c.items()}
    finally:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from flows import prefect_api

        state = prefect_api.read_state(root)
        if state is not None:
            prefect_api.stop(state, root)
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results["commands"][k]["median_s"] for k in results["commands"]}
                     | {"floor": results["floor_import_cdm"]["median_s"]}))


if __name__ == "__main__":
    main()
