"""The trace scan's matching rules, on stores made here (folders, git objects)."""

import subprocess

from cdm.platform.scan import FolderStore, GitStore, Needles, scan


def needles() -> Needles:
    return Needles("bob", {"ab" * 32: "sample sha256"}, {b"\x01\x02pixels\x03": "sample pixels"})


def test_the_raw_id_matches_as_a_whole_word_only(tmp_path):
    (tmp_path / "a.txt").write_text('{"owner": "bob"}')
    (tmp_path / "b.txt").write_text("bobby and bob-2 and robob are other owners")
    (tmp_path / "c.json").write_text('["data/owners/bob/3/x.png"]')
    report = scan([FolderStore("files", tmp_path)], needles())
    assert sorted(f.where for f in report.findings) == ["a.txt", "c.json"]
    assert not report.ok and report.scanned == {"files": 3}


def test_hashes_and_sample_bytes_match_anywhere_and_names_are_searched(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"bob" + b"\x01\x02pixels\x03")  # binary: no raw-id match
    (tmp_path / ("ab" * 32 + ".png")).write_bytes(b"\x89PNG....")
    (tmp_path / "reports" / "bob").mkdir(parents=True)
    (tmp_path / "reports" / "bob" / "index.html").write_text("nothing here")
    report = scan([FolderStore("files", tmp_path)], needles())
    found = {(f.where, f.what) for f in report.findings}
    assert ("weights.safetensors", "sample pixels") in found
    assert ("weights.safetensors", "raw owner id") not in found
    assert (f"{'ab' * 32}.png", "sample sha256 in name") in found
    assert ("reports/bob/index.html", "raw owner id in name") in found


def test_the_owner_record_may_hold_the_raw_id_but_nothing_else(tmp_path):
    record = tmp_path / "rec"
    record.mkdir()
    (record / "owners.json").write_text('{"ok-1": {"owner": "bob", "state": "revoked"}}')
    store = FolderStore("owner record", record)
    store.allow_raw_id = True
    assert scan([store], needles()).ok
    (record / "owners.json").write_text('{"ok-1": {"owner": "bob", "token_sha256": "' + "ab" * 32 + '"}}')
    assert [f.what for f in scan([store], needles()).findings] == ["sample sha256"]


def test_git_objects_are_scanned_even_when_no_commit_reaches_them(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f.txt").write_text("clean")
    subprocess.run(["git", "add", "f.txt"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=tmp_path,
                   check=True)
    assert scan([GitStore("git", tmp_path)], needles()).ok
    subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=tmp_path, input=b"owner bob", check=True,
                   capture_output=True)
    report = scan([GitStore("git", tmp_path)], needles())
    assert [f.what for f in report.findings] == ["raw owner id"] and report.scanned["git"] == 4
