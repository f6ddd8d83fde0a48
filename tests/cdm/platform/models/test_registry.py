"""The registry adapter on a real MLflow SQLite store: a model version created with its provenance tags, queries by
owner key, the ledger anchor, and the purge (runs and logged models garbage-collected, tags removed)."""

import json

from cdm.platform.models import cleanup, registry


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


def test_a_registry_that_cannot_be_read_is_never_read_as_absent(tmp_path, dead_registry):
    """Every read that answers "absent" (no alias, no version, no run, not revoked) raises when the registry is
    down instead; the purge fails rather than skipping what it could not read. On the old code alias_version,
    version_exists, run_exists and ledger_anchor returned None/False and the purge passed."""
    import pytest
    from mlflow.exceptions import MlflowException

    for read in (lambda c: registry.alias_version(c, registry.COMPOSITE),
                 lambda c: registry.version_exists(c, "cdm-shard-s1", "1"),
                 lambda c: registry.run_exists(c, "0" * 32),
                 lambda c: registry.ledger_anchor(c),
                 lambda c: registry.revocation_epoch(c),
                 lambda c: registry.revoked_by(c, "cdm-shard-s1", "1"),
                 lambda c: cleanup.purge(c, cleanup.Backend(f"sqlite:///{tmp_path}/x.db"), [("cdm-shard-s1", "1")], [])):
        with pytest.raises(MlflowException):
            read(dead_registry)
    # The same reads on a store that answers: absent is absent.
    c = registry.client(f"sqlite:///{tmp_path}/mlflow.db")
    assert registry.alias_version(c, registry.COMPOSITE) is None and registry.ledger_anchor(c) is None
    registry.ensure_registered(c, registry.COMPOSITE)
    assert registry.alias_version(c, registry.COMPOSITE) is None  # the model exists, its alias does not
    assert not registry.version_exists(c, "cdm-shard-s1", "1") and not registry.run_exists(c, "0" * 32)
