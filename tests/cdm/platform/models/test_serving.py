import json
import threading

import pytest
import torch

from cdm.model import ModelConfig, build_unet, save_unet
from cdm.platform.models.serving import build_composite
from cdm.platform.models.weights import WEIGHTS_FILE, load_verified_unet, sha256_file


def test_weights_whose_hash_differs_from_the_record_are_refused(tmp_path):
    torch.manual_seed(0)
    folder = save_unet(build_unet(ModelConfig.preset("tiny")), tmp_path / "unet")
    good = sha256_file(folder / WEIGHTS_FILE)
    assert load_verified_unet(folder, good) is not None
    with pytest.raises(ValueError, match="does not match"):
        load_verified_unet(folder, "0" * 64)
    (folder / WEIGHTS_FILE).unlink()
    torch.save({}, folder / "diffusion_pytorch_model.bin")  # a pickle file is never loaded
    with pytest.raises(ValueError, match="safetensors only"):
        load_verified_unet(folder, None)


def test_consumer_subset_only_keeps_shards_made_solely_of_allowed_owners():
    cfg = ModelConfig.preset("tiny")
    unets = [build_unet(cfg).eval() for _ in range(3)]
    spec = {"shards": [{"owners": {"a": 5}, "class_counts": [1] * 10}, {"owners": {"a": 1, "b": 1},
                                                                          "class_counts": [1] * 10},
                       {"owners": {"c": 3}, "class_counts": [1] * 10}],
            "model_config": json.loads(cfg.to_json()), "sampler": "ddpm", "estimator": "path", "eta": 1.0,
            "num_inference_steps": 5}
    _, _, subset = build_composite(spec, unets, allowed_owner_keys=["a", "c"])
    assert subset == [0, 2]  # the shard shared with b is excluded
    with pytest.raises(PermissionError):
        build_composite(spec, unets, allowed_owner_keys=["b"])


@pytest.mark.parametrize("evaluation", ["loop", "auto"])
def test_a_served_composite_loads_only_the_shards_a_request_uses(evaluation):
    """A composite of many shards serves a consumer's subset, or `prior` draws, without loading the others;
    a shard is loaded once and kept for the next requests."""
    from cdm.platform.models.serving import LazyShard, ShardSet, sample_composite

    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    unets = [build_unet(cfg).eval() for _ in range(4)]
    loads: list[int] = []

    def loader(i):
        return lambda: (loads.append(i), unets[i])[1]

    shards = [LazyShard(loader(i), cfg.null_label) for i in range(4)]
    if evaluation == "auto":  # as the pyfunc serves: small steps in one grouped call over the needed shards
        shards = ShardSet(shards)
    spec = {"shards": [{"owners": {k: 5}, "class_counts": [1] * 10} for k in "abcd"],
            "model_config": json.loads(cfg.to_json()), "sampler": "ddpm", "estimator": "prior", "eta": 1.0,
            "num_inference_steps": 3}
    comp, sampler, subset = build_composite(spec, shards, allowed_owner_keys=["c"], evaluation=evaluation)
    assert loads == [] and subset == [2]  # building the composite loads nothing
    sample_composite(comp, sampler, spec, torch.full((3,), 10), seed=0)
    assert loads == [2]
    comp, sampler, _ = build_composite(spec, shards, seed=1, evaluation=evaluation)
    sample_composite(comp, sampler, spec, torch.full((1,), 10), seed=1)  # one sample: one shard drawn
    assert len(loads) <= 2 and len(set(loads)) == len(loads)  # at most the drawn one more, none twice
    before = list(loads)
    again = build_composite(spec, shards, allowed_owner_keys=["c"], evaluation=evaluation)
    sample_composite(*again[:2], spec, torch.full((2,), 10), 0)
    assert loads == before  # kept, not loaded again


def test_a_request_abandons_its_trajectory_as_soon_as_a_shard_it_uses_is_revoked(monkeypatch):
    """A revocation accepted while a request samples is seen within the request (the registry is asked every
    CHECK_EVERY_SECONDS), not after the trajectory: the request starts again without the shard and answers with
    the others only."""
    from cdm.platform.models import serving

    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    unets = [build_unet(cfg).eval() for _ in range(2)]
    steps: list[int] = []

    class Counting(serving.ShardSet):  # counts the network calls (one per step: the shards' grouped network)
        def __call__(self, *args, **kwargs):
            steps.append(1)
            return super().__call__(*args, **kwargs)

    class Watch:  # the registry's answer: shard 0 revoked from the second look on
        looks = 0

        def check(self):
            Watch.looks += 1
            return {0} if Watch.looks > 1 else set()

    model = serving.CompositeModel()
    model.spec = {"shards": [{"id": f"s{i}", "owners": {k: 5}, "class_counts": [1] * 10} for i, k in enumerate("ab")],
                  "model_config": json.loads(cfg.to_json()), "sampler": "ddpm", "estimator": "average",
                  "eta": 1.0, "num_inference_steps": 50, "threshold": 0.0}
    model.watch, model._dropped, model.router, model._lock = Watch(), set(), None, threading.Lock()
    model.shards = Counting([serving.LazyShard(lambda u=u: u, cfg.null_label) for u in unets])
    monkeypatch.setattr(serving, "CHECK_EVERY_SECONDS", 0.0)
    out = model.predict(None, {"n": 2, "seed": 0})
    assert out["shards"] == ["s1"] and out["images"].shape == (2, 1, 8, 8)
    # The first trajectory stopped after its first step (checked then), the second ran its 50 steps: 51 network
    # calls, not the 100 of a request that finishes a trajectory before looking.
    assert len(steps) == 1 + 50, len(steps)
    with pytest.raises(PermissionError):
        model.shards[0].denoiser()  # the revoked shard's weights are gone from this process
    # A request that never used the revoked shard (a consumer allowed only b's) is not started again.
    Watch.looks, steps[:] = 0, []
    model.watch, model._dropped = Watch(), set()
    model.shards = Counting([serving.LazyShard(lambda u=u: u, cfg.null_label) for u in unets])
    out = model.predict(None, {"n": 2, "seed": 0, "allowed_owners": ["b"]})
    assert out["shards"] == ["s1"] and len(steps) == 50


@pytest.fixture
def logged_paragon(tmp_path):
    """A real tiny paragon registered in a SQLite registry with a file artifact store: (client, Logged, root)."""
    from cdm.platform.models import registry

    c = registry.client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = registry.experiment_id(c, (tmp_path / "artifacts").as_uri())
    torch.manual_seed(0)
    unet = save_unet(build_unet(ModelConfig.preset("tiny")), tmp_path / "unet")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"weights_sha256": sha256_file(unet / WEIGHTS_FILE)}))
    logged = registry.log_model_run(
        c, exp, registry.PARAGON, run_name="train-paragon", model_code="shard.py",
        artifacts={"unet": str(unet), "meta": str(meta)}, params={}, metrics=None, files=[],
        version_tags={"cdm.owner_keys": json.dumps(["ok-a", "ok-b"])})
    return c, logged, tmp_path


def test_a_served_paragon_or_shard_refuses_once_a_revocation_marks_it(logged_paragon):
    """`ShardModel` (shards, the paragon, the base) is served under the invariant like the composite: a process
    that loaded it answers until a revocation marks its version, and refuses from the next request on, with a
    message an MLflow scoring server's client can read; a new load is refused too (no watch on the old code)."""
    from mlflow.exceptions import MlflowException

    from cdm.platform.models import registry
    from cdm.platform.models.serving import NotServed

    c, logged, root = logged_paragon
    model = registry.load_pyfunc(c, f"models:/{registry.PARAGON}/{logged.version}", root / "dl")
    assert model.predict({"n": 1, "seed": 0})["images"].shape == (1, 1, 8, 8)  # served before
    c.set_model_version_tag(registry.PARAGON, logged.version, registry.REVOKED, "rev-test")
    registry.bump_revocation_epoch(c)
    with pytest.raises(NotServed, match="rev-test") as refused:
        model.predict({"n": 1, "seed": 0})
    assert refused.value.get_http_status_code() == 403 and isinstance(refused.value, PermissionError)
    with pytest.raises(MlflowException, match="revocation"):
        registry.load_pyfunc(c, f"models:/{registry.PARAGON}/{logged.version}", root / "dl2")


def test_a_model_whose_code_was_rewritten_in_the_store_is_not_loaded(logged_paragon):
    """MLflow's models from code execute the code file stored with the model: cdm loads a model only when that
    file is the installed copy (a planted file would have replaced the revocation watch)."""
    from cdm.platform.models import registry

    c, logged, root = logged_paragon
    registry.load_pyfunc(c, f"models:/{registry.PARAGON}/{logged.version}", root / "ok")  # the control loads
    # Its environment never installs PyPI's unrelated `cdm`: our own distribution name, pinned.
    reqs = (root / "ok" / "requirements.txt").read_text().split()
    assert not [r for r in reqs if r.split("==")[0].split("@")[0].strip() == "cdm"]
    assert [r for r in reqs if r.startswith(registry.DISTRIBUTION)], reqs
    (stored,) = [p for p in (root / "artifacts").rglob("shard.py")]
    stored.write_text(stored.read_text() + "\nimport os  # planted\n")
    with pytest.raises(ValueError, match="differs from the installed"):
        registry.load_pyfunc(c, f"models:/{registry.PARAGON}/{logged.version}", root / "tampered")


def test_mlflows_own_scoring_server_refuses_a_paragon_at_the_first_request_after_a_revocation(logged_paragon):
    """`mlflow models serve -m models:/cdm-paragon/<v>`, MLflow's own scoring server in its own process, answers
    until a revocation marks the version (as `cdm revoke` does at acceptance) and refuses the very next request,
    with a status and a message its client reads; no restart, no reload."""
    import json as _json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    from cdm.platform.models import registry

    c, logged, root = logged_paragon
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                               f"models:/{registry.PARAGON}/{logged.version}", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env, cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def ask() -> tuple[int, str]:
        body = _json.dumps({"inputs": {"n": 1, "seed": 0}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline, "the scoring server did not start"
                time.sleep(0.5)
        status, body = ask()
        assert status == 200 and "predictions" in body, (status, body[:500])  # served before: the control
        c.set_model_version_tag(registry.PARAGON, logged.version, registry.REVOKED, "rev-test")
        registry.bump_revocation_epoch(c)
        status, body = ask()
        assert status == 403 and "rev-test" in body and "not served" in body, (status, body[:500])
        assert ask()[0] == 403  # and stays refused
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
