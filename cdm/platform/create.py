"""Creating a workspace: git, DVC with a remote, the MLflow store, params.yaml, consumers.yaml, dvc.yaml."""

from __future__ import annotations

from pathlib import Path

from cdm.platform.workspace.gitrepo import commit, git
from cdm.platform.workspace.paths import Workspace

GITIGNORE = """\
/mlflow/mlflow.db
/mlflow/artifacts/
/.cdm/
/.dvc-storage/
/outputs/
/pipeline/samples.png
"""

DVC_YAML = """\
# The evaluation pipeline a CI job runs (`dvc repro`): each stage is the `cdm` command a user runs, re-run only when
# its data, params or upstream output changed. The composite is registered as a *candidate* and evaluated; nothing
# is served until `cdm promote --candidate` (the CI job's last step, on the default branch, after a passing
# evaluation). `dvc metrics diff main` compares metrics.json (tracked in git) with the base branch; `dvc plots show`
# draws FID and NLL with their intervals per composite version and the shards' training losses. `cdm ci-report`
# writes the Markdown a CI job shows (with the candidate's sample grid, pipeline/samples.png, kept out of git).
stages:
  train:
    cmd: cdm train --paragon --workspace . --out pipeline/train.json --curves pipeline/train_loss
    deps:
      - data
    params:
      - data
      - train
    outs:
      - pipeline/train.json:
          cache: false
    plots:
      - pipeline/train_loss:  # one CSV per shard: step, loss
          cache: false
          x: step
          y: loss
  compose:
    cmd: cdm compose --candidate --workspace . --out pipeline/compose.json
    deps:
      - pipeline/train.json
    params:
      - compose
    outs:
      - pipeline/compose.json:
          cache: false
  evaluate:
    cmd: >-
      cdm evaluate --candidate --workspace . --fail-on-regression --out metrics.json
      --history pipeline/evaluations.csv --grid pipeline/samples.png
    deps:
      - pipeline/compose.json
    params:
      - evaluate
    metrics:
      - metrics.json:
          cache: false
    outs:
      - pipeline/evaluations.csv:  # one row per composite version, kept across runs
          cache: false
          persist: true
plots:
  - fid:
      title: FID per composite version, with its 95% interval and the real-vs-real floor
      x: composite_version
      y:
        pipeline/evaluations.csv: [fid, fid_low, fid_high, floor_real]
  - nll:
      title: NLL bound (bits/dim) per composite version, with its 95% interval
      x: composite_version
      y:
        pipeline/evaluations.csv: [nll_bpd, nll_bpd_low, nll_bpd_high]
"""

CONSUMERS_YAML = """\
# Access rights: which owners' compartments each consumer may sample from.
#   consumers:
#     NAME: {owners: [owner-a, owner-b]}      # by owner
#     NAME: {licenses: [cc-by]}               # by the license owners gave at ingestion
consumers: {}
"""


def empty_mlflow_store() -> Path:
    """An empty SQLite tracking store with MLflow's migrations applied (~9 s), made once per MLflow version in the
    user's cache folder (`CDM_CACHE_DIR` overrides it) and copied into each new workspace. It holds MLflow's tables
    and its default experiment only — nothing of any workspace."""
    import os
    import tempfile

    import mlflow
    import platformdirs

    cache = Path(os.environ.get("CDM_CACHE_DIR") or platformdirs.user_cache_dir("cdm"))
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.exists():
        from mlflow import MlflowClient

        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            db = Path(tmp) / "store.db"
            MlflowClient(f"sqlite:///{db}").search_experiments()  # creates and migrates the tables
            os.replace(db, template)  # atomic: concurrent first uses each make one, one wins
    return template


def init_workspace(root: str | Path, remote: str | None = None, endpoint_url: str | None = None,
                   artifact_root: str | None = None, params=None) -> Workspace:
    """Create (or complete) a workspace: git, DVC with a remote (local folder unless `remote`), MLflow store,
    params.yaml, consumers.yaml, dvc.yaml, an empty tracked data/. Existing files are kept.
    """
    import yaml

    from cdm.config import Params
    from cdm.platform.data import dvc

    ws = Workspace(Path(root))
    ws.root.mkdir(parents=True, exist_ok=True)
    top = git(ws.root, "rev-parse", "--show-toplevel", check=False).strip()
    if not top or Path(top).resolve() != ws.root:
        git(ws.root, "init", "-q")
    gi = ws.root / ".gitignore"
    existing = gi.read_text() if gi.exists() else ""
    missing = [line for line in GITIGNORE.splitlines() if line not in existing.splitlines()]
    if missing:
        gi.write_text(existing + ("" if existing.endswith("\n") or not existing else "\n") + "\n".join(missing) + "\n")
    if not ws.params_path.exists():
        (params or Params()).dump(ws.params_path)
    if not ws.consumers_path.exists():
        ws.consumers_path.write_text(CONSUMERS_YAML)
    if not (ws.root / "dvc.yaml").exists():
        (ws.root / "dvc.yaml").write_text(DVC_YAML)
    config = ws.config()
    if artifact_root:
        config.setdefault("mlflow", {})["artifact_root"] = artifact_root
    if endpoint_url:
        config.setdefault("s3", {})["endpoint_url"] = endpoint_url
    ws.config_path.write_text("# Where this workspace keeps models and reaches S3.\n" + yaml.safe_dump(config or {
        "mlflow": {"tracking_uri": None, "artifact_root": None}, "s3": {"endpoint_url": None}}, sort_keys=False))
    (ws.root / "mlflow").mkdir(exist_ok=True)
    from cdm.platform.models import registry

    # The tracking store and experiment exist from the start (creating the SQLite tables takes seconds, which
    # would otherwise land on the first training run): a new SQLite store is a copy of an empty, migrated one.
    uri = ws.tracking_uri(config)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        import shutil

        shutil.copyfile(empty_mlflow_store(), uri.removeprefix("sqlite:///"))
    registry.experiment_id(registry.client(uri), ws.artifact_root(config))
    for d in (ws.state_dir, ws.owners_dir):
        d.mkdir(parents=True, exist_ok=True)
    ws.secret()
    if not (ws.root / ".dvc").is_dir():
        url = remote or ".dvc-storage"  # DVC stores it relative to .dvc/
        dvc.init(ws.root, url, endpoint_url if (remote or "").startswith("s3://") else None)
    if not (ws.root / "data.dvc").exists():
        dvc.add_and_push(ws.root, push=False)
    commit(ws.root, "cdm: initialise workspace", ".gitignore", "params.yaml", "consumers.yaml", "dvc.yaml",
           "workspace.yaml", "data.dvc", ".dvc")
    return ws
