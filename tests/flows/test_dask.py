"""Shard training on a real Dask cluster: a local cluster of worker processes (prefect-dask's DaskTaskRunner).

Slow (`make test-slow`); `make test` trains on a Dask cluster in the stack's story (tests/flows/test_stack.py).
Three single-owner shards train on two worker processes: two at once, each in its own process, with weights
bit-identical to the same training run one after another in this process; then a worker is killed (kill -9) in the
middle of a shard, and the shard is rescheduled and resumes from its last slice checkpoint.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from cdm.platform.workspace.context import Context
from cdm.platform.create import init_workspace
from flows.ingestion import ingest
from flows.training import placement, run_training

pytestmark = pytest.mark.usefixtures("prefect_harness")
OWNERS = ("ann", "ben", "cat")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, small_params, digit_owners) -> Path:
    """Three owners of 60 digits each, ingested; shards of 80 steps in 4 slices (checkpoints to resume from)."""
    tmp = tmp_path_factory.mktemp("dask")
    p = small_params()
    p.train.steps, p.train.num_slices, p.train.min_shard_samples = 80, 4, 0
    ws = init_workspace(tmp / "ws", params=p)
    import numpy as np

    pick = {o: (np.ones(1797, bool), 60) for o in OWNERS}
    sources = digit_owners(tmp / "sources", pick)
    ctx = Context.load(ws.root)
    for owner in OWNERS:
        ingest(ctx, owner, str(sources[owner]))
    return ws.root


def copy_with(root: Path, dest: Path, **train) -> Context:
    """A copy of the workspace (same secret, data, git and DVC; a fresh MLflow store) with other train params."""
    shutil.copytree(root, dest)
    params = dest / "params.yaml"
    from cdm.config import Params

    p = Params.load(params)
    for k, v in train.items():
        setattr(p.train, k, v)
    p.dump(params)
    return Context.load(dest)


def weights(ctx: Context, result: dict) -> dict[str, str]:
    return {sid: ctx.client.get_model_version(info["name"], info["version"]).tags["cdm.weights_sha256"]
            for sid, info in result["shards"].items()}


def worker_processes() -> list[psutil.Process]:
    """This process's Dask worker processes (spawned by the local cluster's nannies)."""
    return [p for p in psutil.Process().children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]


@pytest.mark.slow  # ~90 s: `make test-slow` (make test trains on Dask in tests/flows/test_stack.py)
def test_shards_train_in_parallel_worker_processes_with_the_sequential_weights(ingested, tmp_path):
    on_dask = copy_with(ingested, tmp_path / "dask", task_runner="dask", max_workers=2)
    one_by_one = copy_with(ingested, tmp_path / "seq", task_runner="sequential")
    where = placement(on_dask.params.train)
    assert where.threads is not None
    result = run_training(on_dask)
    shards = result["shards"]
    assert len(shards) == 3 and not any(s["skipped"] for s in shards.values())
    workers = {s["worker"] for s in shards.values()}
    assert len(workers) == 2 and all(not w.endswith(f":{psutil.Process().pid}") for w in workers)
    spans = sorted((s["started_at"], s["finished_at"]) for s in shards.values())
    assert any(a[1] > b[0] for a, b in zip(spans, spans[1:])), f"no two shards overlapped: {spans}"
    threads = torch.get_num_threads()
    torch.set_num_threads(where.threads)  # what each worker process used
    try:
        sequential = run_training(one_by_one)
    finally:
        torch.set_num_threads(threads)
    assert {s["worker"] for s in sequential["shards"].values()} == {f"{__import__('socket').gethostname()}:"
                                                                    f"{psutil.Process().pid}"}
    assert weights(on_dask, result) == weights(one_by_one, sequential)


@pytest.mark.slow  # ~70 s: `make test-slow`
def test_a_killed_worker_process_is_survived_and_the_shard_resumes_from_its_checkpoint(ingested, tmp_path):
    ctx = copy_with(ingested, tmp_path / "killed", task_runner="dask", max_workers=2)
    reference = copy_with(ingested, tmp_path / "ref", task_runner="sequential")
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(run_training(ctx)))
    runner.start()
    killed = []
    deadline = time.time() + 300
    while runner.is_alive() and time.time() < deadline and not killed:
        if any(ctx.ws.checkpoints_dir.glob("*/*.safetensors")):
            for proc in worker_processes():
                proc.kill()  # SIGKILL: the worker dies in the middle of its shard
                killed.append(proc.pid)
        time.sleep(0.05)
    runner.join(timeout=600)
    assert killed, "no checkpoint was written before the run ended"
    shards = out["shards"]
    assert len(shards) == 3
    assert any(s["resumed_from_slice"] >= 0 for s in shards.values()), shards
    assert not {int(s["worker"].rsplit(":", 1)[1]) for s in shards.values()} & set(killed)
    threads = torch.get_num_threads()
    torch.set_num_threads(placement(ctx.params.train).threads)
    try:
        expected = run_training(reference)
    finally:
        torch.set_num_threads(threads)
    assert weights(ctx, out) == weights(reference, expected)


def test_the_local_training_cluster_refuses_a_client_without_its_key():
    """The local cluster's scheduler speaks mutual TLS with a CA made for it alone: a client with the cluster's
    credentials runs a task (the positive control), one with plain TCP or with another CA's certificate cannot
    even connect (on the old settings the scheduler listened on plain tcp:// for anyone)."""
    from distributed import Client, LocalCluster
    from distributed.security import Security

    from flows.training import local_cluster

    settings = local_cluster(1, None) | {"processes": False}  # one in-process worker: the scheduler is the same
    with LocalCluster(**settings) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        with Client(cluster.scheduler_address, security=cluster.security, timeout=30) as ours:
            assert ours.submit(lambda: 41 + 1).result(timeout=30) == 42
        for stranger in ({}, {"security": Security.temporary()}):
            with pytest.raises(Exception):
                Client(cluster.scheduler_address.replace("tls://", "tcp://") if not stranger
                       else cluster.scheduler_address, timeout=5, **stranger)
