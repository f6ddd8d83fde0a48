"""`cdm`: the command line of the compartmentalized diffusion pipeline (click). Longer than most modules (~340
lines) because every command declares its options and help here, in one place a user's `--help` reads from.

Every command goes through `run()`: the workspace's environment is set (its own Prefect home unless
PREFECT_API_URL points at a server; Prefect's console logs go to `.cdm/logs/cdm.log`), the command's function in
`flows/commands.py` runs with the workspace's `Context`, and its outcome is mapped to the exit-code contract:

    0 success;  2 bad input or a refused request (one line on stderr: `cdm <command>: <reason>`);  1 failure.

With --json, stdout carries exactly one JSON document.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import click

EPILOG = ("Every command takes --workspace DIR (default: $CDM_WORKSPACE, else the current folder). Exit codes: 0 "
          "success, 2 bad input or a refused request, 1 internal failure. Docs: README.md and docs/design.md.")


def env_defaults() -> None:
    """Quiet, offline-friendly defaults for the libraries (set before they are imported)."""
    # Prefect's ephemeral API can take long to start on a fresh machine; telemetry off everywhere.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # artifact downloads are tiny here
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "creating tables" and the like: not for people
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run at …" after each run
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # transformers' notices at import (e.g. image processors without torchvision, which cdm never uses)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# Commands that run Prefect flows (or serve them): only these import Prefect and route its loggers; the others
# (status, sample, promote, consent, ci-report, ui, init, stack down) answer without it.
FLOW_COMMANDS = {"demo", "ingest", "train", "pretrain", "compose", "revoke", "finish-revocation", "evaluate", "serve",
                 "stack up"}
# Of those, the ones that run flows against the workspace's own API (flows/prefect_api.py): `serve` starts its own
# server with the UI on :4200; `stack up` deploys to the stack's; `demo` creates its workspace as it goes.
LOCAL_API_COMMANDS = FLOW_COMMANDS - {"serve", "stack up", "demo"}


@contextlib.contextmanager
def workspace_env(root: Path, verbose: bool, owners: tuple[str, ...] = (), command: str = "", creates: bool = False):
    """The workspace's Prefect home and API (unless PREFECT_API_URL is set: a flow command uses the workspace's
    running API, `flows/prefect_api.py`) and logging: library log records and warnings go to
    `<root>/.cdm/logs/cdm.log` instead of the console (`--verbose` keeps them on the console too), with raw owner
    ids — the records' and `owners` named on the command line — replaced by their keys."""
    stack = _stack_env(root)
    saved = {k: os.environ.get(k) for k in {"PREFECT_HOME", "PREFECT_API_URL", "PREFECT_API_AUTH_STRING",
                                             "CDM_WORKSPACE_PREFECT_API", *stack}}
    if stack:
        os.environ.update(stack)
    elif not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_HOME"] = str(root / ".cdm" / "prefect")
        if command in LOCAL_API_COMMANDS and (root / "params.yaml").is_file():
            from flows import prefect_api

            if prefect_api.wanted():
                from cdm.platform.stack.services import credentials
                from cdm.platform.workspace.paths import Workspace

                try:
                    os.environ.update(prefect_api.ensure(root, credentials(Workspace(root))["prefect_auth"]))
                except Exception as e:  # noqa: BLE001 - the command still runs, on a server of its own
                    print(f"cdm: the workspace's Prefect API is not available ({type(e).__name__}: {e}); this "
                          "command starts its own", file=sys.stderr)
    if (root / "params.yaml").is_file() or (creates and (not root.exists() or not any(root.iterdir()))):
        log_file = root / ".cdm" / "logs" / "cdm.log"  # a workspace, or one `init`/`demo` is about to create
    else:  # not a workspace: leave no trace in someone else's folder
        import tempfile

        log_file = Path(tempfile.gettempdir()) / f"cdm-{os.getuid()}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    redact = None
    if log_file.parent == root / ".cdm" / "logs" and (root / ".cdm" / "secret").exists():
        from cdm.platform.workspace.owner_records import RedactOwnerIds
        from cdm.platform.workspace.paths import Workspace

        redact = RedactOwnerIds(Workspace(root), also=owners)
        handler.addFilter(redact)
    if command in FLOW_COMMANDS or "prefect" in sys.modules:
        import prefect  # noqa: F401 - configures its loggers on import; we route them below
    # Prefect's API log handlers send records to its database: redacted there too.
    from flows import api_log_handlers

    api_handlers = api_log_handlers() if redact is not None and "prefect" in sys.modules else []
    for h in api_handlers:
        h.addFilter(redact)

    moved: list[tuple[logging.Logger, logging.Handler]] = []
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for h in list(getattr(logger, "handlers", [])):
            # Console handlers (Prefect's, plain stream handlers, rich's); test harness handlers stay.
            if not verbose and type(h).__name__ in ("PrefectConsoleHandler", "StreamHandler", "RichHandler"):
                logger.removeHandler(h)
                moved.append((logger, h))
    roots = {lg for lg, _ in moved} | {logging.getLogger()}
    for logger in roots:
        logger.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield log_file
    finally:
        logging.captureWarnings(False)
        for logger in roots:
            logger.removeHandler(handler)
        for h in api_handlers:
            h.removeFilter(redact)
        for logger, h in moved:
            logger.addHandler(h)
        handler.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stack_env(root: Path) -> dict[str, str]:
    """Where the workspace's stack is and its credentials when it is up (`cdm stack up`), else {}."""
    from cdm.platform.stack.services import active, client_env, stack_dir
    from cdm.platform.workspace.paths import Workspace

    ws = Workspace(root)
    stack = active(ws)
    if stack is None:
        return {}
    return {**client_env(ws, stack), "PREFECT_HOME": str(stack_dir(ws) / "prefect-home")}


def classify(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception."""
    from cdm.config import ConfigError
    from cdm.platform.data.dvc import RemoteError
    from cdm.platform.workspace.errors import CommandFailed, WorkspaceError

    if isinstance(e, CommandFailed):
        code, message = e.code, str(e)
    elif isinstance(e, (WorkspaceError, ConfigError, PermissionError, FileExistsError)):
        code, message = 2, str(e)
    elif isinstance(e, RemoteError):  # storage down or refusing: not the user's input, but not a bug either
        code, message = 1, f"storage failure: {e}"
    elif isinstance(e, click.ClickException):
        code, message = 2, e.format_message()
    else:
        code, message = 1, f"internal error: {type(e).__name__}: {e}"
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return code, (lines[0] if lines else type(e).__name__) + (f" (+{len(lines) - 1} lines: --json)" if len(lines) > 1 else "")


def run(name: str, workspace: str, want_json: bool, verbose: bool, fn, *args, flows: bool | None = None,
        ready=None) -> None:
    """Run one command's function `fn(*args) -> (result, text)` in the workspace's environment; exit with the
    contract's code. `flows`: whether this invocation runs Prefect flows here (default: by `FLOW_COMMANDS`).
    `ready() -> (None, "")`: the refusals a flow command can give from the workspace's files and registry alone,
    checked first without Prefect, so bad input is answered before any API server is imported or started."""
    real_stdout = sys.stdout
    root = Path(workspace).expanduser().resolve()
    code, result, text, message = 0, None, "", None
    try:
        named = args[1] if name in ("revoke", "ingest", "consent") and len(args) > 1 else None
        owners = (named,) if isinstance(named, str) else ()
        uses = name if flows is None else (name if flows else "")
        if ready is not None:
            with workspace_env(root, verbose, owners, "") as log_file:
                code, result, text, message = _outcome(name, log_file, verbose, want_json, ready)
        if message is None:
            with workspace_env(root, verbose, owners, uses, creates=name in ("init", "demo")) as log_file:
                code, result, text, message = _outcome(name, log_file, verbose, want_json, fn, *args)
    except KeyboardInterrupt:
        sys.exit(130)
    if want_json:
        doc = result if isinstance(result, dict) else ({} if result is None else {"result": result})
        if message is not None:
            doc = {**doc, "error": message, "exit_code": code}
        print(json.dumps(doc, indent=2, sort_keys=True, default=str), file=real_stdout)
    elif text:
        print(text, file=real_stdout)
    if message is not None:
        print(f"cdm {name}: {message}", file=sys.stderr)
    sys.exit(code)


def _outcome(name: str, log_file: Path, verbose: bool, want_json: bool, fn, *args):
    """(exit code, result, text, error message or None) of `fn(*args) -> (result, text)`."""
    # With --json, stdout carries only the JSON document; everything else goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if want_json else contextlib.nullcontext():
        try:
            result, text = fn(*args)
            return 0, result, text, None
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - mapped to the exit-code contract
            code, message = classify(e)
            logging.getLogger("cdm").error("cdm %s failed (exit %d)", name, code, exc_info=True)
            if verbose or code == 1:
                message += f" [details: {log_file}]"
            return code, getattr(e, "result", None), getattr(e, "text", ""), message


def bars(want_json: bool) -> bool:
    """Progress bars only for a person at a terminal: not with --json, not into a log file or a CI job's output
    (a redirected stderr would collect every refresh of every bar)."""
    return not want_json and sys.stderr.isatty()


def common(f):
    """--workspace, --json, --verbose on every command."""
    f = click.option("--verbose", is_flag=True, help="show library logs on the console (always in .cdm/logs/cdm.log)")(f)
    f = click.option("--json", "want_json", is_flag=True, help="print one JSON document on stdout")(f)
    f = click.option("--workspace", default=lambda: os.environ.get("CDM_WORKSPACE", "."), show_default="$CDM_WORKSPACE or .",
                     type=click.Path(file_okay=False), help="workspace folder")(f)
    return f


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli():
    """Compartmentalized diffusion models: one denoiser per data owner's compartment, composed at sampling time;
    an owner's revocation deletes their compartment instead of retraining everything."""


@cli.command()
@click.argument("dir", type=click.Path(file_okay=False))
@click.option("--remote", help="DVC remote URL (s3://bucket/prefix or a folder); default: DIR/.dvc-storage")
@click.option("--endpoint-url", help="S3 endpoint URL (e.g. a MinIO or moto server)")
@click.option("--artifact-root", help="MLflow artifact root (s3://... or file://...); default: DIR/mlflow/artifacts")
@click.option("--conditioning", type=click.Choice(["class", "text"]), default="class", show_default=True,
              help="what samples are conditioned on: class labels (class folders of PNGs), or captions (text: "
              "imagefolders of PNGs beside metadata.jsonl, composed on a text-to-image base)")
@common
def init(dir, remote, endpoint_url, artifact_root, conditioning, workspace, want_json, verbose):
    """Create a workspace: git, DVC (+ remote), MLflow store, params.yaml, consumers.yaml."""
    from flows import commands

    run("init", dir, want_json, verbose, commands.init, dir, remote, endpoint_url, artifact_root, conditioning)


@cli.command()
@click.option("--quick", is_flag=True, help="small settings: a few minutes on 2 CPU cores")
@click.option("--owners", type=click.IntRange(2, 10), default=4, show_default=True, help="number of data owners")
@click.option("--partition", type=click.Choice(["iid", "by-class"]), default="iid", show_default=True,
              help="how the digits are split between owners")
@click.option("--out", default="demo-workspace", show_default=True, help="workspace folder to create")
@click.option("--base/--no-base", default=True, show_default=True,
              help="the paper's recipe: a fifth of the digits not held out becomes public (no owner's), "
                   "pretrains a shared base, and every shard and the paragon fine-tune from it")
@click.option("--text", is_flag=True, help="the text-to-image story instead: captioned coloured digits, a base "
              "pretrained on public captions, LoRA compartments, prompts with attribution, a revocation, alignment "
              "before and after (about 6 minutes on 2 cores; --out defaults to demo-text-workspace)")
@common
def demo(quick, owners, partition, out, base, text, workspace, want_json, verbose):
    """The whole story on scikit-learn's digits in a fresh workspace (owners' sources go to OUT.sources/); with
    --text, on captioned digits in a text workspace."""
    from flows import commands

    if text:
        out = "demo-text-workspace" if out == "demo-workspace" else out
        run("demo", out, want_json, verbose, commands.demo_text, out, owners, bars(want_json))
        return
    run("demo", out, want_json, verbose, commands.demo, out, quick, owners, partition, bars(want_json), base)


@cli.command()
@click.argument("owner")
@click.argument("source")
@click.option("--license", help="license of the data (overrides owner.yaml)")
@click.option("--cron", help="schedule of this owner's ingestion under `cdm serve` (default: daily at 03:00)")
@click.option("--token-stdin", is_flag=True, help="read the owner's token from stdin's first line (or set "
              "CDM_OWNER_TOKEN): needed to change an existing owner's source")
@click.option("--operator", is_flag=True, help="change an existing owner's source without their token, as the "
              "workspace's operator (recorded in the ledger)")
@common
def ingest(owner, source, license, cron, token_stdin, operator, workspace, want_json, verbose):
    """Validate OWNER's batch from SOURCE (a folder or s3://bucket/prefix in <label>/<file>.png layout, optional
    owner.yaml) and commit it; exit 2 and no change if any file is bad. PNG only, each side between
    data.min_dimension and data.max_dimension pixels (params.yaml), converted to data.image_size."""
    from flows import commands

    run("ingest", workspace, want_json, verbose, commands.ingest, workspace, owner, source, license, cron,
        token_stdin, operator, ready=lambda: commands.ingest_ready(workspace, owner, source))


@cli.command()
@click.argument("owner")
@common
def consent(owner, workspace, want_json, verbose):
    """Record a new consent of a revoked OWNER (ledger entry, new token): ingestion of them is allowed again."""
    from flows import commands

    run("consent", workspace, want_json, verbose, commands.consent, workspace, owner)


@cli.command()
@click.option("--owners", help="comma-separated owners: train only their shards")
@click.option("--paragon", is_flag=True, help="also train the paragon on all owners' data")
@click.option("--out", help="also write the result to this JSON file (the DVC train stage's output)")
@click.option("--curves", help="also write each shard's training loss into this folder as <shard>.csv (step, loss) for `dvc plots`")
@common
def train(owners, paragon, out, curves, workspace, want_json, verbose):
    """Train shards whose data or config changed (one Prefect task per shard)."""
    from flows import commands

    run("train", workspace, want_json, verbose, commands.train, workspace, owners, paragon, bars(want_json), out,
        curves, ready=lambda: commands.train_ready(workspace, owners))


@cli.command()
@click.argument("source", required=False)
@click.option("--steps", type=click.IntRange(min=1), help="optimizer steps (default: params.yaml train.init_steps)")
@click.option("--from", "brought", metavar="DIR", help="register your own base instead of training one: a diffusers "
              "UNet folder (save_pretrained layout) that fits the workspace's data and model")
@click.option("--trained-on", help="with --from: what that base was trained on (recorded; certificates quote it)")
@common
def pretrain(source, steps, brought, trained_on, workspace, want_json, verbose):
    """Train the shared initialization (cdm-init@current) on public data at SOURCE that belongs to no owner (refused
    if any sample is also an owner's), or register a base you already have (--from DIR --trained-on TEXT)."""
    from flows import commands

    run("pretrain", workspace, want_json, verbose, commands.pretrain, workspace, source, steps, bars(want_json),
        brought, trained_on)


@cli.command()
@click.option("--estimator", type=click.Choice(["path", "router", "prior", "average"]),
              help="composition weights (default: params.yaml compose.estimator)")
@click.option("--out", help="also write the result to this JSON file (the DVC compose stage's output)")
@click.option("--candidate", is_flag=True, help="register it as `candidate` (not served) for an evaluation to "
              "decide: `cdm evaluate --candidate`, then `cdm promote --candidate`")
@common
def compose(estimator, out, candidate, workspace, want_json, verbose):
    """Register a composite of the latest shards and make it production."""
    from flows import commands

    run("compose", workspace, want_json, verbose, commands.compose, workspace, estimator, bars(want_json), out,
        candidate, ready=lambda: commands.compose_ready(workspace))


@cli.command()
@click.option("--candidate", "candidate", is_flag=True, required=True,
              help="promote the `candidate` composite (the only kind of promotion there is)")
@click.option("--metrics", default="metrics.json", show_default=True,
              help="its evaluation: it must be of the candidate's version and have passed")
@common
def promote(candidate, metrics, workspace, want_json, verbose):
    """Make the candidate composite production, once its evaluation passed (the CI job's last step on the
    default branch). A compare-and-set through the serving gate: refused if production moved meanwhile or the
    candidate saw an owner under revocation."""
    from flows import commands

    run("promote", workspace, want_json, verbose, commands.promote, workspace, metrics)


@cli.command()
@click.option("--n", type=int, required=True, help="number of samples (1-10000)")
@click.option("--label", type=int, help="class label, on a class workspace (default: unconditional)")
@click.option("--prompt", help="what to draw, on a text workspace (e.g. 'a red 3 on the left'); '' for none")
@click.option("--negative-prompt", help="text workspace: what guidance pushes away from (default: the empty prompt)")
@click.option("--guidance-scale", type=float, help="text workspace: classifier-free guidance of the composite "
              "(default: params.yaml compose.guidance_scale; 1 = no guidance)")
@click.option("--steps", type=int, help="text workspace: denoising steps (default: compose.num_inference_steps)")
@click.option("--consumer", help="compose only the shards this consumer may use (consumers.yaml)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", help="PNG grid to write (default: WORKSPACE/outputs/samples.png)")
@common
def sample(n, label, prompt, negative_prompt, guidance_scale, steps, consumer, seed, out, workspace, want_json,
           verbose):
    """Sample from the production composite, with per-owner attribution of every sample. A class workspace
    samples a label (--label), a text workspace a prompt (--prompt)."""
    from flows import commands

    text = {"prompt": prompt, "negative_prompt": negative_prompt, "guidance_scale": guidance_scale, "steps": steps}
    run("sample", workspace, want_json, verbose, commands.sample, workspace, n, label, consumer, seed, out, text)


@cli.command()
@click.argument("owner")
@click.option("--reason", help="recorded in the certificate")
@click.option("--token-stdin", is_flag=True, help="read the owner's token (issued at first ingestion) from the first "
              "line of stdin; or set CDM_OWNER_TOKEN. Without a token: an operator request")
@click.option("--token", help="the owner's token on the command line (other users see it in `ps`: prefer "
              "--token-stdin or CDM_OWNER_TOKEN)")
@click.option("--wait", is_flag=True, help="wait for the purge and the certificate instead of returning once "
              "the owner is out of serving")
@common
def revoke(owner, reason, token_stdin, token, wait, workspace, want_json, verbose):
    """Revoke OWNER: out of serving in seconds (their schedule removed, every served composite drops their shards
    at its next request), then in the background: retrain shared shards, purge, scan every store, certify."""
    from flows import commands

    # Without --wait no flow runs here (acceptance and going live are recorded steps; the rest runs in the
    # background process): Prefect is neither imported nor started before the owner is out of serving.
    run("revoke", workspace, want_json, verbose, commands.revoke, workspace, owner, reason, token, wait,
        bars(want_json), token_stdin, flows=wait)


@cli.command("sign-revocation")
@click.argument("owner_key")
@click.option("--reason", help="recorded in the certificate (signed with the request)")
@click.option("--token-stdin", is_flag=True, help="read the owner's token from stdin's first line (or set "
              "CDM_OWNER_TOKEN)")
@click.option("--token", help="the token on the command line (other users see it in `ps`)")
def sign_revocation(owner_key, reason, token_stdin, token):
    """Print the signed payload of a `cdm.owner.revoked` event for OWNER_KEY (the key printed at the owner's first
    ingestion), as one JSON line. Only the token's holder can make one; the workspace keeps just the key that checks
    it, and a payload is accepted for 10 minutes. Needs no workspace. Emit it with Prefect:
    `emit_event("cdm.owner.revoked", resource={"prefect.resource.id": "cdm.owner.OWNER_KEY"}, payload=PAYLOAD)`."""
    from cdm.platform.workspace.errors import WorkspaceError
    from flows import commands

    try:
        payload, text = commands.sign_revocation(owner_key, reason, token, token_stdin)
    except WorkspaceError as e:
        print(f"cdm sign-revocation: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)


@cli.command("finish-revocation", hidden=True)
@click.argument("owner_key")
@click.option("--token-stdin", is_flag=True, help="read the owner's token from the first line of stdin")
@common
def finish_revocation(owner_key, token_stdin, workspace, want_json, verbose):
    """Finish a revocation that is out of serving (started by `cdm revoke` in the background)."""
    from flows import commands

    run("finish-revocation", workspace, want_json, verbose, commands.finish_revocation, workspace, owner_key,
        token_stdin)


@cli.command()
@click.option("--fail-on-regression", is_flag=True, help="exit 1 when a params.yaml threshold is crossed")
@click.option("--out", help="also write the metrics to this file (e.g. metrics.json)")
@click.option("--history", help="also add this evaluation's figures (with intervals) to a CSV, one row per "
              "composite version (for `dvc plots`)")
@click.option("--grid", help="also write a sample grid of the evaluated composite to this PNG")
@click.option("--candidate", is_flag=True, help="evaluate the `candidate` composite instead of production")
@common
def evaluate(fail_on_regression, out, history, grid, candidate, workspace, want_json, verbose):
    """FID and its ratio to the paragon, the NLL bound, attribution, memorization, membership of revoked owners:
    each figure with its 95% interval, noise floor and a verdict (met / inconclusive / failed)."""
    from flows import commands

    run("evaluate", workspace, want_json, verbose, commands.evaluate, workspace, out, fail_on_regression, history,
        grid, candidate, ready=lambda: commands.evaluate_ready(workspace, candidate))


@cli.command("ci-report")
@click.option("--base", default="main", show_default=True, help="git revision to compare the metrics with")
@click.option("--out", help="also write the Markdown report to this file (e.g. $GITHUB_STEP_SUMMARY)")
@common
def ci_report(base, out, workspace, want_json, verbose):
    """The evaluation as a CI job reports it, in Markdown: the figures with their intervals and noise floor,
    `dvc metrics diff` against BASE, the regressions and the sample grid."""
    from flows import commands

    run("ci-report", workspace, want_json, verbose, commands.ci_report, workspace, base, out)


@cli.command()
@common
def status(workspace, want_json, verbose):
    """Owners, shards, the production composite, revocations in progress, ledger verification."""
    from flows import commands

    run("status", workspace, want_json, verbose, commands.status, workspace)


@cli.command()
@common
def serve(workspace, want_json, verbose):
    """Serve deployments: per-owner ingestion schedules and the revocation trigger (a Prefect server on loopback
    unless PREFECT_API_URL is set)."""
    from flows import commands

    run("serve", workspace, want_json, verbose, commands.serve, workspace)


@cli.command()
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--print-only", is_flag=True, help="print the commands instead of starting the MLflow UI")
@common
def ui(port, print_only, workspace, want_json, verbose):
    """Browse models and runs: starts the MLflow UI on this workspace's store (and prints the Prefect UI command)."""
    from flows import commands

    run("ui", workspace, want_json, verbose, commands.ui, workspace, port, print_only)


@cli.group()
def stack():
    """The production stack on this machine: PostgreSQL, an S3 API (moto), an MLflow tracking server, a Prefect
    server and a worker on a work pool. After `up`, every command on the workspace uses it."""


@stack.command("up")
@click.option("--pool", default="cdm", show_default=True, help="Prefect work pool the worker polls")
@click.option("--s3-endpoint", help="an existing S3 API for MLflow's artifacts (keys from AWS_*); default: moto")
@common
def stack_up(pool, s3_endpoint, workspace, want_json, verbose):
    """Start the stack (ports on 127.0.0.1, credentials generated into .cdm/stack/, never printed), deploy the
    workspace's flows to the work pool, and print where each service is."""
    from flows import commands

    run("stack up", workspace, want_json, verbose, commands.stack_up, workspace, pool, s3_endpoint, bars(want_json))


@stack.command("down")
@common
def stack_down(workspace, want_json, verbose):
    """Stop every process of the stack; its PostgreSQL cluster stays for the next `up`."""
    from flows import commands

    run("stack down", workspace, want_json, verbose, commands.stack_down, workspace)


PRIVATE_UMASK = 0o077


def main(argv: list[str] | None = None) -> int:
    """The console script; returns the exit code (usage errors are refusals: one line, exit 2)."""
    # Everything a command creates is private from creation (owner data, the DVC cache and remote, checkpoints,
    # the MLflow store, stack files, logs): 0600 files and 0700 folders. Set once, here; the processes a command
    # starts (servers, workers, flow runs) inherit it.
    os.umask(PRIVATE_UMASK)
    env_defaults()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="cdm", standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        name = e.ctx.info_name if getattr(e, "ctx", None) is not None and e.ctx.parent is not None else None
        print(f"cdm{' ' + name if name else ''}: {e.format_message()}", file=sys.stderr)
        return 2
    except click.exceptions.Abort:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
