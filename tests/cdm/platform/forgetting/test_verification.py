"""The verification's needles: taken once at `begin`, as strong after the purge deleted the owner's data as before,
and a scan that searched for less is reported (a certificate needs none missing)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cdm.platform.workspace import owner_records
from cdm.platform.workspace.context import Context
from cdm.platform.forgetting.record import needles_path
from cdm.platform.forgetting.scan import Needles
from cdm.platform.forgetting.needles import missing_needles, needle_counts, needles


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def ctx(tmp_path) -> Context:
    from cdm.platform.create import init_workspace
    from cdm.platform.data.ingest import ingest

    ctx = Context.load(init_workspace(tmp_path / "ws").root)
    for owner, seeds in (("erin", (0, 1, 2)), ("frank", (2, 3))):  # one image both hold
        src = tmp_path / owner / "3"
        src.mkdir(parents=True)
        for s in seeds:
            (src / f"{s}.png").write_bytes(png(s))
        ingest(ctx, owner, str(src.parent), push=False)
        owner_records.issue_token(ctx.ws, ctx.ws.owner_key(owner))
    return ctx


def test_the_needles_taken_at_begin_hold_after_the_data_is_deleted_and_a_weaker_scan_is_reported(ctx,
                                                                                                  begin_needles):
    import shutil

    ws = ctx.ws
    rev = begin_needles(ctx, "erin", "rev-test")
    before, pixels = needles(ctx, rev)
    counts = needle_counts(before)
    # Three files of hers, one of which frank holds too: that one is his as well, and no needle of hers.
    assert pixels and counts["sample file bytes"] == 2 and counts["sample pixels"] == 2, counts
    assert counts["sample sha256"] == 2 and counts["token public key"] == 1
    assert png(2) not in before.blobs and png(0) in before.blobs
    assert missing_needles(ctx, rev, before) == {}
    # The purge deletes the owner's folder (a kill right after it: purge:after-commit); the rerun's needles are
    # the same, bytes and pixels included.
    shutil.rmtree(ws.owners_dir / "erin")
    after, pixels_after = needles(ctx, rev)
    assert pixels_after and after.blobs == before.blobs and after.hex_strings == before.hex_strings
    # A scan that searched without the files and pixels (the old rerun's needles): reported, kind by kind.
    weaker = Needles("erin", dict(before.hex_strings), {}, before.others)
    assert missing_needles(ctx, rev, weaker) == {"sample file bytes": [0, 2]}
    # A request begun before the files were recorded (its needles file without them), its data gone: the scan would
    # search for less than `begin` recorded, and says so.
    legacy = json.loads(needles_path(ws, rev.request_id).read_text())
    del legacy["sample_files"]
    needles_path(ws, rev.request_id).write_text(json.dumps(legacy))
    old, pixels_old = needles(ctx, rev)
    assert not pixels_old and missing_needles(ctx, rev, old) == {"sample file bytes": [0, 2]}
