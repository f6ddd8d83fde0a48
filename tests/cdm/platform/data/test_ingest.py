"""Ingestion at the library level: every bad input is refused with its file and reason, and nothing changes;
a property test over random mixes of good and bad files."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cdm.config import Params
from cdm.platform.workspace.context import Context
from cdm.platform.workspace.errors import WorkspaceError
from cdm.platform.data.ingest import IngestionRejected, ingest


def png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)).save(buf, format="PNG", **save)
    return buf.getvalue()


def good_png(seed: int) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Context:
    from cdm.platform.create import init_workspace

    p = Params()
    p.data.max_file_bytes = 5000
    p.data.max_dimension = 64
    return Context.load(init_workspace(tmp_path_factory.mktemp("ingest") / "ws", params=p).root)


@pytest.fixture(scope="module")
def ws(ctx):
    return ctx.ws


def snapshot(ws) -> tuple:
    files = sorted((str(p.relative_to(ws.root)), p.stat().st_size) for p in ws.data_dir.rglob("*"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True).stdout
    cache = sorted(str(p) for p in (ws.root / ".dvc" / "cache").rglob("*") if p.is_file())
    return files, head, (ws.root / "data.dvc").read_text(), cache


BAD_FILES = {
    "zero-byte": ("3/empty.png", b"", "empty file"),
    "not an image": ("3/text.png", b"this is text", "does not decode"),
    "truncated": ("3/trunc.png", good_png(1)[:40], "does not decode"),
    "corrupt chunk": ("3/crc.png", good_png(2)[:-20] + b"\x00" * 20, "does not decode"),
    "too large": ("3/big.png", png(np.random.default_rng(3).integers(0, 256, (80, 80), dtype=np.uint8)), "larger than"),
    "dimension bomb": ("3/bomb.png", png(np.zeros((2000, 2), dtype=np.uint8)), "beyond the bound"),
    "label outside the set": ("12/x.png", good_png(4), "not in the label set"),
    "not in a label folder": ("loose.png", good_png(5), "layout"),
    "unsafe name": ("3/bad name!.png", good_png(6), "unsafe file name"),
    "hidden name": ("3/.hidden.png", good_png(7), "unsafe file name"),
    "duplicate content": ("4/dup.png", good_png(0), "duplicate content"),
    "jpeg named png": ("3/photo.png", (lambda b: (Image.new("L", (8, 8)).save(b, format="JPEG"), b.getvalue())[1])(
        io.BytesIO()), "not a PNG"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_each_bad_file_is_named_with_its_reason_and_nothing_changes(ctx, ws, tmp_path, case):
    name, data, reason = BAD_FILES[case]
    src = tmp_path / "src"
    (src / "3").mkdir(parents=True)
    (src / "3" / "good.png").write_bytes(good_png(0))
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_bytes(data)
    before = snapshot(ws)
    with pytest.raises(IngestionRejected) as e:
        ingest(ctx, "owner-bad", str(src))
    problems = e.value.report.problems
    assert any(p.file == name and reason in p.reason for p in problems), problems
    assert snapshot(ws) == before


def test_a_rejected_batch_leaves_no_validation_report_outside_the_workspace(ctx, tmp_path, monkeypatch):
    """great-expectations' ephemeral context builds a docs site in a system temp folder by default; the report of a
    rejected batch names its files and sample hashes, so it must only be written inside the workspace."""
    import tempfile

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    src = tmp_path / "src"
    (src / "3").mkdir(parents=True)
    (src / "3" / "good.png").write_bytes(good_png(0))
    (src / "3" / "bad name!.png").write_bytes(good_png(6))
    with pytest.raises(IngestionRejected) as e:
        ingest(ctx, "owner-leak", str(src))
    assert e.value.report.docs and ctx.ws.root in Path(e.value.report.docs).parents
    assert not [p for p in system_tmp.rglob("*") if p.is_file()], sorted(system_tmp.rglob("*"))[:5]


def test_symlink_outside_the_source_is_refused(ctx, tmp_path):
    src = tmp_path / "src"
    (src / "3").mkdir(parents=True)
    (src / "3" / "good.png").write_bytes(good_png(0))
    secret = tmp_path / "secret.png"
    secret.write_bytes(good_png(9))
    os.symlink(secret, src / "3" / "link.png")
    with pytest.raises(IngestionRejected, match="symlink pointing outside"):
        ingest(ctx, "owner-link", str(src))


def test_palette_alpha_and_16_bit_images_are_converted(ctx, ws, tmp_path):
    src = tmp_path / "src"
    (src / "5").mkdir(parents=True)
    base = np.random.default_rng(11).integers(0, 256, (8, 8), dtype=np.uint8)
    (src / "5" / "palette.png").write_bytes(png(base, "P"))
    (src / "5" / "alpha.png").write_bytes(png(np.stack([base] * 3 + [np.full_like(base, 255)], -1)))
    (src / "5" / "deep.png").write_bytes(png((base.astype(np.uint16) * 257 + 1)))
    result = ingest(ctx, "owner-modes", str(src), push=False)
    assert result.added == 3
    data = ws.load_owner("owner-modes", 8, 1, range(10))
    assert data.x.shape == (3, 1, 8, 8) and float(data.x.min()) >= -1 and float(data.x.max()) <= 1


def test_empty_owner_unsafe_owner_id_and_missing_source(ctx, ws, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestionRejected, match="no samples"):
        ingest(ctx, "owner-empty", str(tmp_path / "empty"))
    from cdm.platform.workspace import owner_records

    assert owner_records.record_of(ws, "owner-empty")[1] is None  # a refused first ingestion leaves no record
    for bad in ("../escape", "/abs", "UPPER", "a b", "", "x" * 65, "owner/../../x"):
        with pytest.raises(WorkspaceError, match="not allowed"):
            ingest(ctx, bad, str(tmp_path / "empty"))
    from cdm.platform.data.sources import SourceError

    with pytest.raises(SourceError, match="not found"):
        ingest(ctx, "owner-nosrc", str(tmp_path / "missing"))


_counter = itertools.count()
GOOD = st.integers(min_value=0, max_value=10_000).map(lambda s: ("good", s))
BAD = st.sampled_from(sorted(BAD_FILES)).map(lambda k: ("bad", k))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(GOOD, GOOD, BAD), min_size=0, max_size=6))
def test_any_mix_commits_exactly_the_good_batch_or_nothing(ctx, ws, tmp_path_factory, batch):
    src = tmp_path_factory.mktemp("mix")
    good, bad = {}, []
    for i, (kind, value) in enumerate(batch):
        if kind == "good":
            data = good_png(value)
            if data in good.values():
                continue  # same content twice would be a (bad) duplicate; keep the batch's intent clear
            path = src / str(value % 10) / f"g{i}.png"
            good[path] = data
        else:
            name, data, _ = BAD_FILES[value]
            if value == "duplicate content" and not good:
                continue
            path = src / name
            if path.exists():
                continue  # the same bad case twice adds nothing
            if value == "duplicate content":
                data = next(iter(good.values()))
            bad.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    owner = f"prop-{next(_counter)}"
    before = snapshot(ws)
    if good and not bad:
        result = ingest(ctx, owner, str(src), push=False)
        from cdm.data import sha256_bytes

        stored = {s["sha256"] for s in ws.manifest(owner)["samples"]}
        assert stored == {sha256_bytes(d) for d in good.values()} and result.total == len(good)
        assert subprocess.run(["git", "status", "--porcelain", "data.dvc"], cwd=ws.root, capture_output=True,
                              text=True).stdout == ""
    else:
        with pytest.raises(IngestionRejected):
            ingest(ctx, owner, str(src), push=False)
        assert snapshot(ws) == before
        assert owner not in ws.owners()


def test_an_ingestion_interrupted_before_its_commit_is_undone_by_the_next_run(ctx, ws, tmp_path, interrupted_ingestion):
    """The state a kill -9 leaves between `dvc add` and the git commit: the next ingestion restores it."""
    from cdm.platform.data import dvc
    from cdm.platform.data.ingest import recover_interrupted

    before = snapshot(ws)
    key, files = interrupted_ingestion(ctx, "owner-crash", tmp_path, good_png(4242))
    assert snapshot(ws) != before  # half-done
    with ws.lock():
        assert recover_interrupted(ctx) == [key]
    assert snapshot(ws) == before
    assert dvc.md5_bytes(files[0]) not in dvc.list_objects(ws.root)["cache"]


def test_the_rerun_of_a_first_ingestion_killed_before_its_commit_commits(ctx, ws, tmp_path, interrupted_ingestion):
    """kill -9 inside an owner's first ingestion, then the same owner again: the rerun's own recovery undoes the
    interrupted batch but keeps the record it is committing for (it removed it, and the rerun failed with "no
    owner record": found by the slow fault test)."""
    from cdm.platform.workspace import owner_records

    src = tmp_path / "src" / "3"
    src.mkdir(parents=True)
    (src / "a.png").write_bytes(good_png(31337))
    key, _ = interrupted_ingestion(ctx, "owner-rerun", tmp_path, good_png(31337))
    result = ingest(ctx, "owner-rerun", str(tmp_path / "src"), push=False)
    assert result.total == 1 and owner_records.record(ws, key).state == "active"
    assert not list(ws.staging_dir.glob("journal-*.json"))


def test_rejection_survives_pickling_with_its_report():
    """Prefect may persist a failed task's exception; the CLI must still see a rejection (exit 2)."""
    import pickle

    from cdm.platform.data.validation import Problem, ValidationReport

    e = IngestionRejected("ok-1234", ValidationReport(False, 1, [Problem("3/a.png", "empty file (0 bytes)")]))
    back = pickle.loads(pickle.dumps(e))
    assert isinstance(back, IngestionRejected) and back.report.problems[0].file == "3/a.png" and str(back) == str(e)


def test_ctrl_c_during_the_push_restores_the_files_at_once_and_leaves_the_objects_to_the_next_command(
        ctx, ws, tmp_path, monkeypatch):
    """An interrupt (not an error) stops the command: nothing of the batch stays visible, and its journal stays
    until the next command under the lock deletes the objects fsspec may still have been uploading."""
    from cdm.platform.data import dvc
    from cdm.platform.data.ingest import recover_interrupted

    before = snapshot(ws)
    src = tmp_path / "src" / "5"
    src.mkdir(parents=True)
    (src / "a.png").write_bytes(good_png(777))

    def interrupted(workspace, retry_delays=()):
        raise KeyboardInterrupt

    monkeypatch.setattr(dvc, "push_with_retries", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest(ctx, "owner-ctrl-c", str(tmp_path / "src"))
    monkeypatch.undo()
    files, head, data_dvc, _ = snapshot(ws)
    assert (files, head, data_dvc) == before[:3]  # the folder and data.dvc are back at once
    assert list(ws.staging_dir.glob("journal-*.json"))  # the objects are the next command's to delete
    with ws.lock():
        recover_interrupted(ctx)
    assert snapshot(ws) == before and not list(ws.staging_dir.glob("journal-*.json"))
    assert dvc.md5_bytes(good_png(777)) not in dvc.list_objects(ws.root)["cache"]
