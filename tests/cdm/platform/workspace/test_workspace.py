"""Workspace paths, owner keys, owner records and consent, the shard plan, and the DVC adapter's targeted deletion
(real `dvc` commands, a local remote)."""

import pytest

from cdm.platform.data import dvc
from cdm.platform.workspace import owner_records
from cdm.platform.workspace.errors import OwnerRevoked, WorkspaceError
from cdm.platform.models.shards import plan_shards
from cdm.platform.workspace.paths import Workspace


@pytest.fixture
def ws(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    return ws


def test_owner_ids_cannot_escape_and_keys_are_stable_and_pseudonymous(ws, tmp_path):
    for bad in ("../x", "/abs", "A", "", "a" * 65):
        with pytest.raises(WorkspaceError, match="not allowed"):
            ws.owner_dir(bad)
    key = ws.owner_key("alice")
    assert key == Workspace(ws.root).owner_key("alice") and key.startswith("ok-") and "alice" not in key
    other = Workspace(tmp_path / "other")
    assert other.owner_key("alice") != key  # another workspace's secret: another key


def test_an_owners_signed_request_is_a_proof_a_stolen_owner_record_cannot_make(ws):
    """The record keeps only the public key the token seeds: whoever copies `owners.json` (or a backup) holds that
    key and everything else in it, and still cannot make a request the check accepts — the old proof (the stored
    sha256 of the token) proved nothing, since it was the stored value itself."""
    import hashlib
    import json
    import time

    key = ws.owner_key("alice")
    owner_records.update(ws, key, owner="alice")
    token = owner_records.issue_token(ws, key)
    rec = owner_records.record(ws, key)
    stolen = json.loads((ws.state_dir / "owners.json").read_text())[key]
    assert token not in json.dumps(stolen) and hashlib.sha256(token.encode()).hexdigest() not in json.dumps(stolen)
    good = owner_records.sign_revocation(token, key, "consent withdrawn")
    owner_records.check_revocation(rec, key, good["reason"], good["issued_at"], good["signature"])  # positive control

    def refused(reason, issued_at, signature, now=None, match="not that of"):
        with pytest.raises(PermissionError, match=match):
            owner_records.check_revocation(rec, key, reason, issued_at, signature, now=now)

    # What a thief can make from the record: the public key, its hash, the key as a signature, a signature made
    # with the stored value as if it were the token.
    for forged in (stolen["token_public_key"], hashlib.sha256(stolen["token_public_key"].encode()).hexdigest(),
                   stolen["token_public_key"] * 2,
                   owner_records.sign_revocation(stolen["token_public_key"], key, "x", good["issued_at"])["signature"]):
        refused("consent withdrawn", good["issued_at"], forged, match="not that of|no valid signature")
    # Another owner's token, a changed reason, a changed time, a copied old request, a key that is not hers.
    other = owner_records.sign_revocation("another-token", key, "consent withdrawn", good["issued_at"])
    refused("consent withdrawn", good["issued_at"], other["signature"])
    refused("other reason", good["issued_at"], good["signature"])
    refused("consent withdrawn", good["issued_at"] + 1, good["signature"])
    refused("consent withdrawn", good["issued_at"], good["signature"],
            now=time.time() + owner_records.PROOF_MAX_AGE_SECONDS + 5, match="older than")
    with pytest.raises(PermissionError, match="not that of"):
        owner_records.check_revocation(rec, ws.owner_key("bob"), "consent withdrawn", good["issued_at"],
                                       good["signature"])
    nan = owner_records.sign_revocation(token, key, "consent withdrawn", float("nan"))
    refused("consent withdrawn", nan["issued_at"], nan["signature"], match="older than")  # never expiring: no
    # An event that waited in a queue is judged by when the server received it, not when its run started.
    owner_records.check_revocation(rec, key, good["reason"], good["issued_at"], good["signature"],
                                   now=good["issued_at"] + 5)


def test_owner_records_keep_the_raw_id_and_a_revoked_owner_needs_a_new_consent(ws):
    key = ws.owner_key("alice")
    owner_records.update(ws, key, owner="alice", source="/data/alice")
    token = owner_records.issue_token(ws, key)
    assert owner_records.authorize(ws, "alice", token) == "owner" and owner_records.authorize(ws, "alice", None) == "operator"
    with pytest.raises(PermissionError):
        owner_records.authorize(ws, "alice", "someone-else")
    owner_records.update(ws, key, state="revoked", revocation="rev-1", drop=("source", "token_public_key"))
    rec = owner_records.record(ws, key)
    assert rec.owner == "alice" and rec.source is None and rec.token_public_key is None
    with pytest.raises(OwnerRevoked, match="cdm consent"):
        owner_records.require_consent(rec, key)
    owner_records.update(ws, key, state="pending", drop=("revocation",))
    owner_records.require_consent(owner_records.record(ws, key), key)  # consent recorded: allowed again
    owner_records.remove(ws, ws.owner_key("nobody"))  # removing what is not there changes nothing
    assert set(owner_records.records(ws)) == {key}


def test_the_plan_keeps_shards_and_groups_small_owners(ws):
    first = plan_shards(ws, {"alice": 200, "bob": 30, "carol": 40}, min_samples=60)
    assert sorted(map(sorted, first.values())) == [["alice"], ["bob", "carol"]]
    again = plan_shards(ws, {"alice": 200, "bob": 30, "carol": 40, "dave": 100}, min_samples=60, previous=first)
    assert {s: o for s, o in again.items() if s in first} == first and ["dave"] in again.values()
    after = plan_shards(ws, {"alice": 200, "carol": 40, "dave": 100}, min_samples=60, previous=again)
    assert ["carol"] in after.values() and not any("bob" in o for o in after.values())


def test_dvc_deletes_exactly_the_given_objects_from_cache_and_remote(ws, tmp_path):
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=ws.root, check=True)
    dvc.init(ws.root, str(tmp_path / "remote"))
    for owner, data in (("alice", b"a-bytes"), ("bob", b"b-bytes")):
        (ws.owners_dir / owner / "1").mkdir(parents=True)
        (ws.owners_dir / owner / "1" / "x.png").write_bytes(data)
    dvc.add_and_push(ws.root, retry_delays=())
    listing = dvc.list_objects(ws.root)
    a, b = dvc.md5_bytes(b"a-bytes"), dvc.md5_bytes(b"b-bytes")
    assert {a, b} <= listing["cache"] and {a, b} <= listing["remote"]
    assert dvc.dir_objects(ws.root, prefix="owners/bob/") == [dvc.data_hash(ws.root)]
    deleted = dvc.delete_objects(ws.root, [b])
    assert deleted == {"cache": [b], "remote": [b]}
    listing = dvc.list_objects(ws.root)
    assert a in listing["cache"] and a in listing["remote"] and b not in listing["cache"] | listing["remote"]


def test_dvc_keeps_its_caches_in_the_workspace_whatever_the_global_config_says(ws, tmp_path, monkeypatch):
    """A global DVC configuration that moves the cache, and a DVC_SITE_CACHE_DIR elsewhere, would put owners' file
    hashes where no purge of this workspace looks: the in-process calls ignore the one and refuse the other."""
    import subprocess

    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(tmp_path / "global"))
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "config").write_text(f"[cache]\n    dir = {elsewhere / 'cache'}\n")
    subprocess.run(["git", "init", "-q"], cwd=ws.root, check=True)
    dvc.init(ws.root, str(tmp_path / "remote"))
    (ws.owners_dir / "alice" / "1").mkdir(parents=True)
    (ws.owners_dir / "alice" / "1" / "x.png").write_bytes(b"a-bytes")
    dvc.add_and_push(ws.root, retry_delays=())
    assert dvc.md5_bytes(b"a-bytes") in dvc.list_objects(ws.root)["cache"]
    assert not elsewhere.exists()
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(elsewhere / "site"))
    with pytest.raises(dvc.DvcError, match="DVC_SITE_CACHE_DIR"):
        dvc.add_and_push(ws.root, retry_delays=())
    assert not elsewhere.exists()
