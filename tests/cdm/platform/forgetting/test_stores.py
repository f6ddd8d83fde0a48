"""Every store, or a refusal: a revocation does not start while a store the workspace used is down, and registry
queries see every page (MLflow answers registered models 100 at a time)."""

from __future__ import annotations

import json
import socket

import pytest

from cdm.config import Params
from cdm.platform.models import registry
from cdm.platform.workspace.context import Context
from cdm.platform.create import init_workspace
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.forgetting.stores import require_reachable


@pytest.fixture
def ctx(tmp_path) -> Context:
    ws = init_workspace(tmp_path / "ws", params=Params())
    ctx = Context.load(ws.root)
    _ = ctx.client  # records the stores in use
    return ctx


def test_a_revocation_refuses_while_the_stack_is_configured_but_down(ctx):
    require_reachable(ctx)  # the positive control: nothing is down
    stack_dir = ctx.ws.state_dir / "stack"
    (stack_dir / "pg").mkdir(parents=True)
    (stack_dir / "stack.json").write_text(json.dumps({
        "mlflow_tracking_uri": "http://127.0.0.1:1", "prefect_api_url": "http://127.0.0.1:2/api",
        "s3_endpoint_url": "http://127.0.0.1:3", "artifacts_destination": "s3://cdm-mlflow/artifacts",
        "work_pool": "cdm", "postgres_port": 4, "started": False}))
    ctx = Context.load(ctx.ws.root)
    assert ctx.stack is None  # down: commands would fall back to the local SQLite store…
    with pytest.raises(WorkspaceError, match="stack .* is down"):  # …which a revocation refuses to trust alone
        require_reachable(ctx)


def test_a_revocation_refuses_while_a_tracking_server_it_used_does_not_answer(ctx):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = ctx.ws.used_stores_path
    used = json.loads(path.read_text())
    used["mlflow"].append(f"http://127.0.0.1:{port}")
    path.write_text(json.dumps(used))
    with pytest.raises(WorkspaceError, match=f"127.0.0.1:{port}.* does not answer"):
        require_reachable(ctx)


def test_registry_queries_see_past_the_first_page(ctx):
    c, key = ctx.client, "ok-00000000000000aa"
    names = [f"{registry.SHARD_PREFIX}s{i:03d}" for i in range(105)]
    for name in names:
        registry.ensure_registered(c, name)
        c.create_model_version(name, source="file:///nowhere", tags={"cdm.owner_keys": json.dumps([key])})
    assert len(c.search_registered_models()) == 100  # what one unpaged call returns
    assert registry.registered_names(c, registry.SHARD_PREFIX) == names
    assert sorted(n for n, _ in registry.versions_tagged(c, key)) == names
