"""`cdm`: the command line of the compartmentalized diffusion pipeline.

Exit codes: 0 success; 2 bad input or a refused request (message on stderr); 1 internal failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

EPILOG = """\
workspace: every command takes --workspace DIR (default: $CDM_WORKSPACE, else the current directory).
exit codes: 0 success, 2 bad input or refused request, 1 internal failure.
docs: README.md; the design: DESIGN.md."""


def env_defaults() -> None:
    # Prefect's ephemeral API can take long to start on a fresh machine (FIELD-NOTES); keep telemetry off.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cdm", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compartmentalized diffusion models: one denoiser per data owner's compartment, composed at "
                    "sampling time; an owner's revocation deletes their compartment instead of retraining.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help)
        s.add_argument("--workspace", default=os.environ.get("CDM_WORKSPACE", "."), help="workspace folder")
        if json_flag:
            s.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        return s

    s = cmd("init", "create a workspace: git, DVC (+ remote), MLflow store, params.yaml, consumers.yaml")
    s.add_argument("dir", help="folder to create or complete")
    s.add_argument("--remote", help="DVC remote URL (s3://bucket/prefix or a folder); default: DIR/.dvc-storage")
    s.add_argument("--endpoint-url", help="S3 endpoint URL (e.g. a MinIO or moto server)")
    s.add_argument("--artifact-root", help="MLflow artifact root (s3://... or file://...); default DIR/mlflow")

    s = cmd("demo", "the whole story on scikit-learn's digits in a fresh workspace")
    s.add_argument("--quick", action="store_true", help="small settings: a few minutes on 2 CPU cores")
    s.add_argument("--owners", type=int, default=4, help="number of data owners (default 4)")
    s.add_argument("--partition", choices=["iid", "by-class"], default="iid", help="how digits are split")
    s.add_argument("--out", default="demo-workspace", help="workspace folder to create (default demo-workspace)")

    s = cmd("ingest", "validate an owner's batch and commit it (exit 2 and no change if any file is bad)")
    s.add_argument("owner", help="owner id: 1-64 of a-z 0-9 _ -")
    s.add_argument("source", help="folder or s3://bucket/prefix in <label>/<file>.png layout (+ optional owner.yaml)")
    s.add_argument("--license", help="license of the data (overrides owner.yaml)")

    s = cmd("train", "train shards whose data or config changed (one Prefect task per shard)")
    s.add_argument("--owners", help="comma-separated owners: train only their shards")
    s.add_argument("--paragon", action="store_true", help="also train the paragon on all owners' data")

    s = cmd("pretrain", "train the shared initialization on public data that belongs to no owner (cdm-init)")
    s.add_argument("source", help="folder or s3://bucket/prefix in <label>/<file>.png layout; validated like an "
                   "ingestion, and refused if any sample is also an owner's")
    s.add_argument("--steps", type=int, help="optimizer steps (default: params.yaml train.init_steps)")

    s = cmd("compose", "register a composite of the latest shards and make it production")
    s.add_argument("--estimator", choices=["path", "router", "prior", "average"],
                   help="composition weights (default: params.yaml compose.estimator)")

    s = cmd("sample", "sample from the production composite, with per-owner attribution")
    s.add_argument("--n", type=int, required=True, help="number of samples")
    s.add_argument("--label", type=int, help="class label (default: unconditional)")
    s.add_argument("--consumer", help="compose only the shards this consumer may use (consumers.yaml)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="PNG grid to write (default: WORKSPACE/outputs/samples.png)")

    s = cmd("revoke", "revoke an owner: drop/retrain their shards, purge everything, certify")
    s.add_argument("owner")
    s.add_argument("--reason", help="recorded in the certificate")
    s.add_argument("--token", help="the owner's secret (issued at first ingestion); without it: operator request")

    s = cmd("evaluate", "FID/KID, ratio to the paragon, attribution, memorization, membership AUC")
    s.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a params.yaml threshold is crossed")
    s.add_argument("--out", help="also write the metrics to this file (e.g. metrics.json)")

    cmd("status", "owners, shards, the production composite, ledger verification")
    cmd("serve", "serve deployments: per-owner ingestion schedules and the revocation trigger", json_flag=False)
    return p


class CliError(Exception):
    """A failure with an exit code; `result` (if any) is still printed (e.g. metrics that crossed a threshold)."""

    def __init__(self, message: str, code: int = 2, result: object = None, text: str = ""):
        super().__init__(message)
        self.code, self.result, self.text = code, result, text


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    env_defaults()
    want_json = getattr(args, "json", False)
    real_stdout = sys.stdout
    try:
        # With --json, stdout carries only the JSON document; everything else goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if want_json else contextlib.nullcontext():
            result, text = dispatch(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - mapped to the exit-code contract
        code, message = classify(e)
        payload = getattr(e, "result", None)
        if want_json:
            doc = payload if isinstance(payload, dict) else {}
            print(json.dumps({**doc, "error": message, "exit_code": code}, indent=2, sort_keys=True, default=str),
                  file=real_stdout)
        elif getattr(e, "text", ""):
            print(e.text, file=real_stdout)
        print(f"cdm {args.command}: {message}", file=sys.stderr)
        return code
    if want_json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str), file=real_stdout)
    elif text:
        print(text, file=real_stdout)
    return 0


def classify(e: BaseException) -> tuple[int, str]:
    from cdm.config import ConfigError
    from cdm.dvc import RemoteError
    from cdm.sources import SourceError
    from cdm.workspace import WorkspaceError

    if isinstance(e, CliError):
        return e.code, str(e)
    if isinstance(e, (WorkspaceError, ConfigError, SourceError, PermissionError)):
        return 2, str(e)
    if isinstance(e, RemoteError):  # storage down or refusing: not the user's input, but not a bug either
        return 1, f"storage failure: {e}"
    if isinstance(e, SystemExit):
        return int(e.code or 0), "exited"
    return 1, f"internal error: {type(e).__name__}: {e}"


def dispatch(args) -> tuple[object, str]:
    from flows import commands

    return getattr(commands, f"cmd_{args.command}")(args)


if __name__ == "__main__":
    # `python -m flows.cli` runs this file as __main__; commands import CliError from `flows.cli`. Run that
    # module's main so both see one CliError class (else a refused request would exit 1 instead of 2).
    from flows.cli import main as module_main

    sys.exit(module_main())
