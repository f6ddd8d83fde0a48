"""The typed context of one command: workspace paths, validated params, and the clients it needs.

Loaded once by an entry point (a CLI command, or a flow started by a deployment) and passed down; nothing below
re-reads `params.yaml` or `workspace.yaml`. Clients are created on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cdm.config import Params
from cdm.platform.workspace import Workspace


@dataclass
class Context:
    ws: Workspace
    params: Params
    config: dict = field(default_factory=dict)  # workspace.yaml: MLflow store and S3 endpoint

    @classmethod
    def load(cls, root: str | Path) -> "Context":
        ws = Workspace(Path(root)).require()
        return cls(ws, Params.load(ws.params_path), ws.config())

    def __getstate__(self) -> dict:
        """Pickled (a task on a Dask worker process) without its clients: the worker makes its own."""
        return {k: v for k, v in self.__dict__.items() if k in ("ws", "params", "config")}

    @property
    def tracking_uri(self) -> str:
        return self.ws.tracking_uri(self.config)

    @property
    def artifact_root(self) -> str:
        return self.ws.artifact_root(self.config)

    @cached_property
    def client(self):
        """The MLflow client of this workspace's store. MLflow's fluent APIs (log_model, register_model,
        pyfunc.load_model, start_run) read only the process-wide URI: it is set here, once per command."""
        from cdm.platform import registry

        return registry.client(self.tracking_uri)

    @cached_property
    def experiment_id(self) -> str:
        from cdm.platform import registry

        return registry.experiment_id(self.client, self.artifact_root)

    def s3(self):
        """A boto3 S3 client for the workspace's endpoint (standard retry mode)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.ws.s3_endpoint_url(self.config),
                            config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def dvc_s3(self):
        """The S3 client when the DVC remote is on S3, else None (a local remote needs none)."""
        from cdm.platform import dvc

        return self.s3() if (dvc.remote_config(self.ws.root)["url"] or "").startswith("s3://") else None
