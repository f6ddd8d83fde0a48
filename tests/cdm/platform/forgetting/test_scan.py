"""The trace scan's matching rules, on stores made here (folders, git objects)."""

import base64
import gzip
import subprocess

import pytest

from cdm.platform.forgetting.scan import FolderStore, GitStore, Needles, scan


def needles(others: tuple[str, ...] = ()) -> Needles:
    return Needles("bob", {"ab" * 32: "sample sha256"}, {b"\x01\x02pixels\x03": "sample pixels"}, others)


def test_a_short_raw_id_matches_between_boundaries_and_other_owners_ids_are_theirs(tmp_path):
    (tmp_path / "a.txt").write_text('{"owner": "bob"}')
    (tmp_path / "b.txt").write_text("bobby and bob-2 and robob are other owners")
    (tmp_path / "c.json").write_text('["data/owners/bob_photos/3/x.png"]')
    (tmp_path / "d.txt").write_text("Owner: BOB")
    report = scan([FolderStore("files", tmp_path)], needles(others=("bobby", "bob-2", "robob")))
    assert sorted(f.where for f in report.findings) == ["a.txt", "c.json", "d.txt"]
    assert not report.ok and report.scanned == {"files": 4}
    # Without knowing bob-2 is an owner, `bob-2` is bob's trace.
    assert "b.txt" in {f.where for f in scan([FolderStore("files", tmp_path)], needles()).findings}


@pytest.mark.parametrize("encode", [
    lambda s: s.encode(), lambda s: s.upper().encode(), lambda s: s.title().encode(), lambda s: s.encode("utf-16-le"),
    lambda s: s.encode("utf-16-be"), lambda s: s.encode().hex().encode(), lambda s: s.encode().hex().upper().encode(),
    lambda s: "".join(f"\\u{ord(c):04x}" for c in s).encode(),
    lambda s: base64.b64encode(s.encode()), lambda s: base64.b64encode(b"x" + s.encode()),
    lambda s: base64.b64encode(b"xy" + s.encode()), lambda s: gzip.compress(s.encode()),
], ids=["plain", "upper", "title", "utf16le", "utf16be", "hex", "HEX", "json-escaped", "b64-0", "b64-1", "b64-2",
        "gzip"])
def test_a_long_raw_id_matches_as_a_substring_in_any_case_and_common_encodings(tmp_path, encode):
    (tmp_path / "f.bin").write_bytes(encode("prefix: carol_photos of 2024, suffix"))
    (tmp_path / "clean.txt").write_text("carolyn's data and nobody else's")
    report = scan([FolderStore("files", tmp_path)], Needles("carol", others=("carolyn",)))
    assert [f.where.split(" ")[0] for f in report.findings] == ["f.bin"], report.findings


def test_binary_formats_are_searched_for_the_raw_id_where_they_keep_text(tmp_path):
    import io

    import torch
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "carol")
    Image.new("L", (8, 8)).save(tmp_path / "tagged.png", pnginfo=info)
    Image.new("L", (8, 8)).save(tmp_path / "plain.png")
    buf = io.BytesIO()
    torch.save({"owner": "carol", "w": torch.zeros(4)}, buf)
    (tmp_path / "state.pt").write_bytes(buf.getvalue())
    (tmp_path / "weights.safetensors").write_bytes(b"carol" * 50)  # weight bytes: never searched for the id
    report = scan([FolderStore("files", tmp_path)], Needles("carol"))
    assert sorted(f.where for f in report.findings) == ["state.pt", "tagged.png"]


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


def test_hex_digests_are_found_in_any_case_inside_longer_hex_runs_and_a_token_in_clear_too(tmp_path):
    sha, md5, token = "0f" * 32, "9a" * 16, "tok_Zx-9q" * 5
    n = Needles("bob", {sha: "sample sha256", md5: "DVC object id", token: "token"}, {})
    cases = {"upper.bin": b"\x00\x01" + sha.upper().encode() + b"\x00",
             "inside-run.txt": b"deadbeef" + sha.encode() + b"cafe",  # one run of 76 hex digits holds it
             "md5.json": b'{"md5": "' + md5.encode() + b'"}', "token.log": b"token=" + token.upper().encode(),
             "near-miss.txt": (sha[:-1] + "x" + md5[1:]).encode(),  # neither digest whole: nothing found
             "nested.txt": ("1" + sha[:20] + md5.upper() + sha[20:]).encode(),  # md5 inside a run that is no sha
             "overlap.txt": (md5[:-2] + sha).encode()}  # a run of 94 digits holding the sha, not the md5
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    found = {(f.where, f.what) for f in scan([FolderStore("files", tmp_path)], n).findings}
    assert found == {("upper.bin", "sample sha256"), ("inside-run.txt", "sample sha256"), ("md5.json", "DVC object id"),
                     ("token.log", "token"), ("nested.txt", "DVC object id"), ("overlap.txt", "sample sha256")}


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


def test_a_versioned_bucket_is_scanned_and_purged_version_by_version(s3):
    """On a versioned bucket a plain delete only hides an object behind a delete marker: the scan reads every
    version (it finds the owner's old bytes: the positive control) and the purge's delete removes every version
    and marker by id. On the old code the scan listed current objects only and the delete left every version."""
    from cdm.platform.data.dvc import s3_delete_every_version, s3_versions
    from cdm.platform.forgetting.scan import S3Store

    bucket = "versioned-remote"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key="files/md5/ab/cd", Body=b"bob's first upload")
    s3.put_object(Bucket=bucket, Key="files/md5/ab/cd", Body=b"a later upload")
    s3.put_object(Bucket=bucket, Key="files/md5/ef/01", Body=b"carol's")
    s3.delete_object(Bucket=bucket, Key="files/md5/ab/cd")  # what a versionless delete does: a marker
    store = S3Store("remote", s3, bucket, "files/")
    found = scan([store], Needles("bob", {}, {}))
    assert [f for f in found.findings if "files/md5/ab/cd?versionId=" in f.where]  # the hidden old version
    assert s3_delete_every_version(s3, bucket, "files/md5/ab/cd")
    assert [k for k, _ in s3_versions(s3, bucket, "files/")] == ["files/md5/ef/01"]  # carol's untouched
    assert scan([store], Needles("bob", {}, {})).ok
    assert not s3_delete_every_version(s3, bucket, "files/md5/ab/cd")  # nothing left: idempotent
