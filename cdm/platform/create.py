"""Creating a workspace: git, DVC with a remote, the MLflow store, params.yaml, consumers.yaml, dvc.yaml."""

from __future__ import annotations

from pathlib import Path

from cdm.platform.gitrepo import commit, git
from cdm.platform.workspace import Workspace

GITIGNORE = """\
/mlflow/mlflow.db
/mlflow/artifacts/
/.cdm/
/.dvc-storage/
/metrics.json
/outputs/
"""

DVC_YAML = """\
# `dvc repro` runs the evaluation of the production composite on the current data.
stages:
  evaluate:
    cmd: cdm evaluate --workspace . --json --fail-on-regression --out metrics.json
    deps:
      - data
    params:
      - evaluate
    metrics:
      - metrics.json:
          cache: false
    always_changed: true
"""

CONSUMERS_YAML = """\
# Access rights: which owners' compartments each consumer may sample from.
#   consumers:
#     NAME: {owners: [owner-a, owner-b]}      # by owner
#     NAME: {licenses: [cc-by]}               # by the license owners gave at ingestion
consumers: {}
"""


def init_workspace(root: str | Path, remote: str | None = None, endpoint_url: str | None = None,
                   artifact_root: str | None = None, params=None) -> Workspace:
    """Create (or complete) a workspace: git, DVC with a remote (local folder unless `remote`), MLflow store,
    params.yaml, consumers.yaml, dvc.yaml, an empty tracked data/. Existing files are kept.
    """
    import yaml

    from cdm.config import Params
    from cdm.platform import dvc

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
    from cdm.platform import registry

    # The tracking store and experiment exist from the start (creating the SQLite tables takes seconds, which
    # would otherwise land on the first training run).
    registry.experiment_id(registry.client(ws.tracking_uri(config)), ws.artifact_root(config))
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
