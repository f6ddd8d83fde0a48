"""MLflow 3 registry: shard, paragon and composite versions with provenance tags; aliases; purge.

Registered models: `cdm-shard-<shard>`, `cdm-paragon`, `cdm-composite` (alias `production`). Tags carry
pseudonymous owner keys and hashes only — never raw owner ids or per-sample hashes, because `mlflow gc` leaves
registry tags behind (docs/design.md §4).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

SHARD_PREFIX = "cdm-shard-"
PARAGON = "cdm-paragon"
COMPOSITE = "cdm-composite"
INIT = "cdm-init"  # the shared initialization (public data only), see cdm.platform.models.pretrain
PRODUCTION = "production"  # alias of the served composite
CANDIDATE = "candidate"  # alias of a composite registered for evaluation, not served (`cdm compose --candidate`)
CURRENT = "current"  # alias of the shared initialization shards start from
LEDGER_HEAD = "cdm.ledger_head"  # registered-model tag on cdm-composite: the audit ledger's anchor
# Version tag: the request id of the revocation that made this version unservable (it saw a revoked owner's data,
# or is a composite of such a version). Set when the revocation is accepted, before anything else moves.
REVOKED = "cdm.revoked"
# Registered-model tag on cdm-composite: changes whenever a revocation is accepted. A serving process compares it
# before and after each request and re-reads its components' tags only when it changed (docs/design.md §5).
REVOCATION_EPOCH = "cdm.revocation_epoch"
EXPERIMENT = "cdm"
DISTRIBUTION = "cdm-compartments"  # our distribution's name: PyPI's `cdm` is an unrelated project
MODELS_DIR = Path(__file__).resolve().parents[2] / "mlflow_models"  # cdm/mlflow_models


@dataclass
class Logged:
    run_id: str
    model_id: str
    name: str
    version: str


def client(tracking_uri: str):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri, tracking_uri)


def experiment_id(c, artifact_root: str | None, name: str = EXPERIMENT) -> str:
    """The experiment's id, created on first use under `artifact_root` (None: where the tracking server puts
    artifacts)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None)


def signature(kind: str = "class"):
    """The pyfunc models' input contract (shard, composite and init alike); `text` for a text workspace's models
    (prompts instead of labels)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, Schema
    from mlflow.types.schema import Array

    if kind == "text":
        return ModelSignature(inputs=Schema([
            ColSpec("string", "prompt", required=False),
            ColSpec("long", "n", required=False),  # images of the prompt (default 1)
            ColSpec(Array("string"), "prompts", required=False),  # instead: one image per prompt
            ColSpec("string", "negative_prompt", required=False),
            ColSpec("double", "guidance_scale", required=False),
            ColSpec("long", "num_inference_steps", required=False),
            ColSpec("long", "seed", required=False),
            ColSpec(Array("string"), "allowed_owners", required=False),
            ColSpec("string", "estimator", required=False),  # a composite's: prior, path or average
        ]), params=ParamSchema([]))
    # One request per call: a one-row frame (a dict is accepted and converted by MLflow against this schema).
    return ModelSignature(inputs=Schema([
        ColSpec("long", "n"),
        ColSpec("long", "label", required=False),  # absent: unconditional
        ColSpec("long", "seed", required=False),
        ColSpec(Array("string"), "allowed_owners", required=False),  # owner keys a consumer may use
        ColSpec("string", "estimator", required=False),
    ]), params=ParamSchema([]))


def pip_requirements() -> list[str]:
    """What a served model's environment installs (MLflow's virtualenv or conda environment managers): the
    versions in use now, and cdm itself from the repository at the commit that logged it (`CDM_REPO`, default
    this checkout's `origin`), never by name from a package index. Without a repository URL, the exact
    version of our own distribution name, which no index serves: such an environment fails instead of
    installing a stranger's package."""
    import importlib.metadata as md
    import subprocess

    import cdm

    def version(name: str) -> str:
        try:
            return f"{name}=={md.version(name).split('+')[0]}"  # no local tag (+cpu): indexes do not serve it
        except md.PackageNotFoundError:
            return name

    src = Path(cdm.__file__).resolve().parent.parent
    git = lambda *args: subprocess.run(["git", *args], cwd=src, capture_output=True, text=True)  # noqa: E731
    repo = os.environ.get("CDM_REPO") or git("remote", "get-url", "origin").stdout.strip()
    commit = git("rev-parse", "HEAD").stdout.strip()
    own = (f"{DISTRIBUTION} @ git+{repo}@{commit}" if repo and len(commit) == 40
           else f"{DISTRIBUTION}=={cdm.__version__}")
    return [version("torch"), version("diffusers"), version("safetensors"), version("peft"), own]


def start_run(exp_id: str, run_name: str, tags: dict[str, str] | None = None):
    """An MLflow run tagged with this process (for `sweep_dead_runs`); open it before the work it times."""
    import mlflow

    owner_process = {"cdm.host": socket.gethostname(), "cdm.pid": str(os.getpid())}
    return mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags={**(tags or {}), **owner_process})


def log_model(c, run, name: str, model_code: str, artifacts: dict[str, str], params: dict,
              metrics: dict[str, list[float]] | None, files: list[str | Path], version_tags: dict[str, str],
              summary: dict[str, float] | None = None, admit=contextlib.nullcontext,
              description: str | None = None, signature_kind: str = "class") -> Logged:
    """Into the active `run`: params, metric histories, files (e.g. sample grids), and a pyfunc model registered
    as `name` with its provenance tags (created together: a crash never leaves an untagged version). The version
    is created inside `admit()`, a context manager that may refuse it (raise) or hold a lock while it is made."""
    import json

    import mlflow
    from mlflow.entities import Metric
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    for key, history in (metrics or {}).items():
        # Log every step, in batches (MLflow caps a batch at 1000 metrics).
        ms = [Metric(key, float(v), 0, i) for i, v in enumerate(history)]
        for i in range(0, len(ms), 1000):
            c.log_batch(run.info.run_id, metrics=ms[i:i + 1000])
    if summary:
        mlflow.log_metrics(summary)
    for f in files:
        mlflow.log_artifact(str(f))
    info = mlflow.pyfunc.log_model(name="model", python_model=str(MODELS_DIR / model_code),
                                   artifacts=artifacts, pip_requirements=pip_requirements(),
                                   signature=signature(signature_kind))
    # The client's create_model_version (not mlflow.register_model, which prints to stderr): the version and its
    # provenance tags are created together, so a crash never leaves an untagged version.
    ensure_registered(c, name)
    with admit():  # e.g. the workspace lock and a check that no owner of these data is under revocation
        mv = c.create_model_version(name, source=info.model_uri, run_id=run.info.run_id, model_id=info.model_id,
                                    tags={k: str(v) for k, v in version_tags.items()}, description=description)
    c.set_logged_model_tags(info.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name,
                                                                               "version": mv.version}])})
    version = str(mv.version)
    return Logged(run.info.run_id, info.model_id, name, version)


def log_model_run(c, exp_id: str, name: str, run_name: str, run_tags: dict[str, str] | None = None, **kwargs) -> Logged:
    """`log_model` in a run of its own (for work that was not timed inside a run)."""
    with start_run(exp_id, run_name, run_tags) as run:
        return log_model(c, run, name, **kwargs)


def pages(search):
    """Every item of a paginated MLflow search: `search(page_token)` returns one page (MLflow answers registered
    models 100 at a time by default; nothing here may stop at the first page)."""
    token = None
    while True:
        page = search(token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def absent(e) -> bool:
    """Whether an MlflowException says the thing asked for does not exist (a model, version, run, or alias), as
    opposed to an outage, a refusal or a bug: only the former may be read as "none". Everything else propagates,
    so that no caller concludes "nothing is served" or "no production" from a registry it could not read."""
    code = getattr(e, "error_code", None)
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    # A missing alias: MLflow answers INVALID_PARAMETER_VALUE "Registered model alias <a> not found."
    return code == "INVALID_PARAMETER_VALUE" and "alias" in str(e) and "not found" in str(e)


def ensure_registered(c, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException as e:
        if not absent(e):
            raise
        try:
            c.create_registered_model(name, tags={"cdm.kind": name.split("-")[1]})
        except MlflowException:  # created meanwhile by another process
            c.get_registered_model(name)


def versions(c, name: str) -> list:
    """All versions of a registered model, oldest first ([] when it does not exist)."""
    found = list(pages(lambda token: c.search_model_versions(f"name = '{name}'", page_token=token)))
    return sorted(found, key=lambda v: int(v.version))


def all_versions(c) -> list:
    """Every version of every registered model."""
    return list(pages(lambda token: c.search_model_versions(page_token=token)))


def registered_models(c) -> list:
    return list(pages(lambda token: c.search_registered_models(page_token=token)))


def latest(c, name: str):
    vs = versions(c, name)
    return vs[-1] if vs else None


def version_exists(c, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_model_version(name, version)
        return True
    except MlflowException as e:
        if not absent(e):
            raise  # an outage is not "gone": a verification must not pass on it
        return False


def run_exists(c, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_run(run_id)
        return True
    except MlflowException as e:
        if not absent(e):
            raise  # an outage is not "gone": a verification must not pass on it
        return False


def versions_tagged(c, owner_key: str) -> list[tuple[str, str]]:
    """(name, version) of every registered version whose `cdm.owner_keys` names the owner."""
    import json

    return [(mv.name, str(mv.version)) for mv in all_versions(c)
            if owner_key in json.loads(mv.tags.get("cdm.owner_keys", "[]"))]


def anchor_ledger(c, head: str) -> None:
    """Record the audit ledger's head outside the ledger file (docs/design.md §5)."""
    ensure_registered(c, COMPOSITE)
    c.set_registered_model_tag(COMPOSITE, LEDGER_HEAD, head)


def ledger_anchor(c) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_registered_model(COMPOSITE).tags.get(LEDGER_HEAD)
    except MlflowException as e:
        if not absent(e):
            raise
        return None


def log_certificate(c, artifact_root: str, cert: dict) -> str:
    """The erasure certificate as `certificate.json` of a run in experiment `cdm-audit`; returns the run id."""
    exp = experiment_id(c, artifact_root, "cdm-audit")
    done = c.search_runs([exp], filter_string=f"attributes.run_name = '{cert['request_id']}'")
    if done:  # a rerun after a crash that had logged it
        return done[0].info.run_id
    run = c.create_run(exp, run_name=cert["request_id"],
                       tags={"cdm.kind": "erasure-certificate", "cdm.owner_key": cert["owner_key"]})
    c.log_dict(run.info.run_id, cert, "certificate.json")
    c.set_terminated(run.info.run_id)
    return run.info.run_id

def alias_version(c, name: str, alias: str = PRODUCTION):
    """The version `alias` names, or None when the model or the alias does not exist. A registry that cannot be
    read raises: "no production" is a fact to act on (serve nothing, expect nothing), never a guess."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if not absent(e):
            raise
        return None


def registered_names(c, prefix: str) -> list[str]:
    return sorted(m.name for m in registered_models(c) if m.name.startswith(prefix))


def runs_of_owner(c, owner_key: str) -> list:
    """Every run (active or deleted, any status) whose `cdm.owner_keys` tag names the owner: training runs carry
    it from their start, so one that registered nothing (refused, killed) is found too."""
    from mlflow.entities import ViewType

    ids = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    runs = pages(lambda token: c.search_runs(ids, filter_string=f"tags.`cdm.owner_keys` LIKE '%{owner_key}%'",
                                             run_view_type=ViewType.ALL, page_token=token))
    return list(runs)


def revocation_epoch(c) -> str | None:
    """The registry's revocation epoch (see REVOCATION_EPOCH); None when no revocation was ever accepted."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_registered_model(COMPOSITE).tags.get(REVOCATION_EPOCH)
    except MlflowException as e:
        if not absent(e):
            raise  # an outage is not "no revocation": a server must not answer on it
        return None


def bump_revocation_epoch(c) -> str:
    """Move the epoch on (callers hold the workspace lock, so the read-modify-write does not race)."""
    ensure_registered(c, COMPOSITE)
    epoch = str(int(revocation_epoch(c) or 0) + 1)
    c.set_registered_model_tag(COMPOSITE, REVOCATION_EPOCH, epoch)
    return epoch


def revoked_by(c, name: str, version: str) -> str | None:
    """Why a version may not be served: the revocation that marked it, 'deleted' when it no longer exists (a purge
    removed it), else None."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, version).tags.get(REVOKED)
    except MlflowException as e:
        if not absent(e):
            raise  # an outage: nobody may conclude anything from it
        return "deleted"


@contextlib.contextmanager
def model_files(c, name: str, version: str, tmp_root: Path | None):
    """The `artifacts/` folder of a registered version's model, downloaded into a temporary folder under
    `tmp_root` (a workspace's `.cdm/tmp`, where the purge and the scan see it; system temp when None) that is
    removed on exit: no copy of a model outlives its use."""
    import mlflow

    if tmp_root is not None:
        tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-", dir=tmp_root) as tmp:
        path = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp,
                                                   tracking_uri=c.tracking_uri)
        yield Path(path) / "artifacts"


def model_id_of(c, name: str, version: str) -> str | None:
    mv = c.get_model_version(name, version)
    return getattr(mv, "model_id", None) or (mv.source.split("/")[-1] if mv.source.startswith("models:/m-") else None)


MODEL_CODE_LOADER = "mlflow.pyfunc.loaders.code_model"


def check_model_code(model_dir: Path) -> None:
    """Refuse (ValueError) a downloaded pyfunc model whose code is not the installed copy. MLflow's models from
    code *execute* the model's code file on load, and that file lives in the artifact store: anyone who could
    write there would replace the revocation watch. So before cdm loads a model it checks that the `MLmodel`
    names only the python_function flavor with MLflow's code-model loader and no extra code paths, and that the
    code file is byte for byte `cdm/mlflow_models/<file>` of this installation."""
    from mlflow.models import Model

    flavors = Model.load(str(model_dir)).flavors
    pf = flavors.get("python_function") or {}
    name = Path(str(pf.get("model_code_path") or "")).name
    installed = MODELS_DIR / name
    if set(flavors) != {"python_function"} or pf.get("loader_module") != MODEL_CODE_LOADER or pf.get("code") \
            or not name.endswith(".py") or not installed.is_file():
        raise ValueError(f"{model_dir}: not a cdm model (its MLmodel names other code or loaders); refusing to load")
    if (model_dir / name).read_bytes() != installed.read_bytes():
        raise ValueError(f"{model_dir / name}: the model's code differs from the installed cdm/mlflow_models/{name} "
                         "(rewritten in the artifact store?); refusing to load")


def load_pyfunc(c, uri: str, dst: str | Path):
    """A registered cdm pyfunc (`models:/name/version` or `models:/name@alias`), downloaded into `dst` and loaded
    only after `check_model_code` passed."""
    import mlflow

    path = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst), tracking_uri=c.tracking_uri))
    check_model_code(path)
    return mlflow.pyfunc.load_model(str(path))


def code_version() -> str:
    """The git commit of the installed cdm (a version's `cdm.code_version` tag), else its package version."""
    import subprocess

    import cdm

    root = Path(cdm.__file__).resolve().parent.parent
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else f"cdm-{cdm.__version__}"


def unchanged(c, name: str, data_hash: str, config_hash: str) -> dict | None:
    """A training's summary when the latest version of `name` has these data and config hashes (nothing to train),
    else None."""
    mv = latest(c, name)
    if mv is not None and mv.tags.get("cdm.data_hash") == data_hash and mv.tags.get("cdm.config_hash") == config_hash:
        return {"name": name, "version": mv.version, "skipped": True, "seconds": 0.0, "steps_run": 0}
    return None
