"""Where one owner's ingestion spends its time, in a served process (imports paid once), phase by phase.

    python bench/ingest_profile.py [--owners 6] [--images 30] [--cli 3]      # -> bench/ingest_profile.json

Times the flow's phases by wrapping the functions each one calls (a measurement, not a change): the Prefect flow
run itself, reading the source, validation (great-expectations), writing the owner's files, `dvc add` + `dvc push`
(in this process, DVC's Python API), the git commit and the owner record; the first owner (cold) is reported apart.
Then `--cli` more owners are ingested by new `cdm ingest` processes, as a user or a cron job runs them (wall time,
imports included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owners", type=int, default=6)
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--cli", type=int, default=3, help="owners ingested by new `cdm ingest` processes afterwards")
    ap.add_argument("--out", default=str(Path(__file__).with_name("ingest_profile.json")))
    args = ap.parse_args()

    from flows.cli import env_defaults

    env_defaults()
    import os

    root = Path(tempfile.mkdtemp(prefix="cdm-ingest-profile-"))
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))

    from cdm.data import digits_uint8, write_class_folders
    from cdm.platform.data import dvc, ingest as ingest_mod
    from cdm.platform.workspace import owner_records
    from cdm.platform.workspace.context import Context
    from cdm.platform.create import init_workspace
    from flows import ingestion
    from tasks import ingest as ingest_tasks

    phases: dict[str, list[float]] = defaultdict(list)

    def wrap(module, name: str, phase: str):
        fn = getattr(module, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[phase].append(time.perf_counter() - t)

        setattr(module, name, timed)

    wrap(dvc, "add_and_push", "dvc add + push (in-process)")
    wrap(ingest_mod, "git_commit", "git commit")
    wrap(ingest_mod, "_write_owner_files", "write owner files + manifest")
    wrap(ingest_tasks, "validate", "validation (great-expectations)")
    wrap(ingest_tasks, "read_source", "read source")
    wrap(owner_records, "update", "owner record")

    ws = init_workspace(root / "ws")
    ctx = Context.load(ws.root)
    x, y = digits_uint8()
    totals = []
    for i in range(args.owners):
        idx = [(i * args.images + k) % len(y) for k in range(args.images)]
        write_class_folders(x[idx], y[idx], root / "src" / f"owner{i}")
        t = time.perf_counter()
        ingestion.ingest(ctx, f"owner{i}", str(root / "src" / f"owner{i}"))
        totals.append(time.perf_counter() - t)
    warm = slice(1, None)
    report = {"owners": args.owners, "images": args.images, "first_total_s": round(totals[0], 3),
              "warm_total_median_s": round(statistics.median(totals[warm]), 3), "phases_warm_median_s": {}}
    accounted = 0.0
    for phase, xs in sorted(phases.items()):
        xs = xs[-len(totals[warm]):]
        report["phases_warm_median_s"][phase] = round(statistics.median(xs), 3)
        accounted += statistics.median(xs)
    report["phases_warm_median_s"]["rest (Prefect flow and task runs, records)"] = round(
        report["warm_total_median_s"] - accounted, 3)
    import subprocess
    import sys

    cli = []
    for i in range(args.owners, args.owners + args.cli):
        idx = [(i * args.images + k) % len(y) for k in range(args.images)]
        write_class_folders(x[idx], y[idx], root / "src" / f"owner{i}")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", "ingest", f"owner{i}", str(root / "src" / f"owner{i}"),
                        "--workspace", str(ws.root), "--json"], check=True, capture_output=True,
                       cwd=Path(__file__).resolve().parent.parent)
        cli.append(time.perf_counter() - t)
    if cli:
        report["cli_process_s"] = {"runs": [round(v, 3) for v in cli], "median": round(statistics.median(cli), 3)}
    report["command"] = "python bench/ingest_profile.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
