"""The registry adapter on a real MLflow SQLite store: a model version created with its provenance tags, queries by
owner key, the ledger anchor, and the purge (runs and logged models garbage-collected, tags removed)."""

import json

from cdm.platform import cleanup, registry


def test_versions_are_tagged_found_by_owner_key_anchored_and_purged(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = registry.client(uri)
    exp = registry.experiment_id(c, (tmp_path / "artifacts").as_uri())
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text("{}")
    logged = registry.log_model_run(
        c, exp, "cdm-shard-s1", run_name="train-s1", model_code="shard.py",
        artifacts={"unet": str(unet), "meta": str(meta)}, params={"owners": 1}, metrics={"train_loss": [1.0, 0.5]},
        files=[], version_tags={"cdm.owner_keys": json.dumps(["ok-1"])})
    assert registry.versions_tagged(c, "ok-1") == [("cdm-shard-s1", logged.version)]
    assert c.get_registered_model("cdm-shard-s1").tags["cdm.kind"] == "shard"
    assert registry.ledger_anchor(c) is None
    registry.anchor_ledger(c, "0:abc")
    assert registry.ledger_anchor(c) == "0:abc"
    result = cleanup.purge(c, cleanup.Backend(uri), [("cdm-shard-s1", logged.version)], ["cdm-shard-s1"])
    assert result["runs"] == [logged.run_id] and result["logged_models"] == [logged.model_id]
    assert not registry.run_exists(c, logged.run_id) and registry.versions_tagged(c, "ok-1") == []
    assert not registry.version_exists(c, "cdm-shard-s1", logged.version)
