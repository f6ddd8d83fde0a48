"""Ingestion into a text workspace: captioned imagefolder batches (PNG files beside metadata.jsonl), refused whole
on one bad entry with nothing changed, committed with their captions (DVC-tracked, never in the manifest), and the
revocation's needles hold the captions."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from cdm.config import Params
from cdm.platform.workspace.context import Context
from cdm.platform.data.ingest import IngestionRejected, ingest
from cdm.text.captions import write_imagefolder
from cdm.text.digits import Domain, caption, glyph_pools, make_scenes, png_rgb, render_all


def owner_batch(folder, seed: int, n: int = 6, domain: Domain | None = None):
    scenes = make_scenes(n, domain or Domain(), seed)
    images = render_all(scenes, glyph_pools(), seed)
    return write_imagefolder([png_rgb(im) for im in images], [caption(s) for s in scenes], folder)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Context:
    from cdm.platform.create import init_workspace

    return Context.load(init_workspace(tmp_path_factory.mktemp("text") / "ws", params=Params.text()).root)


def snapshot(ws) -> tuple:
    files = sorted((str(p.relative_to(ws.root)), p.stat().st_size) for p in ws.data_dir.rglob("*"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True).stdout
    return files, head, (ws.root / "data.dvc").read_text()


def test_a_captioned_batch_is_committed_with_its_captions_beside_the_images(ctx, tmp_path):
    ws = ctx.ws
    src = owner_batch(tmp_path / "src", seed=1)
    result = ingest(ctx, "ursula", str(src), push=False)
    assert result.added == 6
    folder = ws.owner_dir("ursula") / "images"
    captions = ws.captions("ursula")
    assert len(list(folder.glob("*.png"))) == 6 and sorted(captions) == sorted(p.name for p in folder.glob("*.png"))
    source_captions = {json.loads(line)["text"] for line in (src / "metadata.jsonl").read_text().splitlines()}
    assert set(captions.values()) == source_captions
    manifest = (ws.owner_dir("ursula") / "manifest.json").read_text()
    assert not [c for c in source_captions if c in manifest]  # captions live in metadata.jsonl only
    data = ws.load_captioned("ursula", 32)
    assert data.x.shape == (6, 3, 32, 32) and sorted(data.captions) == sorted(captions.values())
    # A second batch adds to the imagefolder; an image already there keeps its caption.
    more = owner_batch(tmp_path / "more", seed=2, n=3)
    shutil.copy(next(src.glob("*.png")), more)
    lines = (more / "metadata.jsonl").read_text().splitlines()
    lines.append(json.dumps({"file_name": next(src.glob("*.png")).name, "text": "a red 1 on the left"}))
    (more / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert ingest(ctx, "ursula", str(more), push=False).added == 3
    assert len(ws.captions("ursula")) == 9 and set(captions.items()) <= set(ws.captions("ursula").items())


BAD = {
    "an image without a caption": (lambda lines: lines[1:], "no caption in metadata.jsonl"),
    "a caption without an image": (lambda lines: lines + [json.dumps({"file_name": "ghost.png", "text": "a red 1 on "
                                                                     "the left"})], "not in the batch"),
    "a file captioned twice": (lambda lines: lines + [lines[0]], "captioned 2 times"),
    "an empty caption": (lambda lines: [json.dumps({"file_name": json.loads(lines[0])["file_name"], "text": " "})]
                         + lines[1:], "empty caption"),
    "an over-long caption": (lambda lines: [json.dumps({"file_name": json.loads(lines[0])["file_name"],
                                                        "text": "a red 1 on the left " * 5})] + lines[1:],
                             "exceeds data.max_caption_chars"),
    "a line that is not JSON": (lambda lines: lines + ["{not json"], "not a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_one_bad_entry_refuses_the_whole_batch_naming_it_and_changes_nothing(ctx, tmp_path, case):
    edit, reason = BAD[case]
    src = owner_batch(tmp_path / "src", seed=3)
    meta = src / "metadata.jsonl"
    meta.write_text("\n".join(edit(meta.read_text().splitlines())) + "\n")
    before = snapshot(ctx.ws)
    with pytest.raises(IngestionRejected) as e:
        ingest(ctx, "victor", str(src), push=False)
    assert any(reason in p.reason for p in e.value.report.problems), e.value.report.problems
    assert snapshot(ctx.ws) == before and "victor" not in ctx.ws.owners()


def test_the_revocations_needles_hold_the_owners_captions_and_not_those_another_owner_shares(ctx, tmp_path,
                                                                                              begin_needles):
    from cdm.platform.forgetting.record import needles_path
    from cdm.platform.forgetting.needles import needle_counts, needles

    ws = ctx.ws
    src = owner_batch(tmp_path / "w", seed=4, domain=Domain(colours=("magenta",), two=0.0))
    ingest(ctx, "wendy", str(src), push=False)
    rev = begin_needles(ctx, "wendy", "rev-text")
    found, _ = needles(ctx, rev)
    counts = needle_counts(found)
    hers = set(ws.captions("wendy").values())
    shared = hers & {t for o in ws.owners() if o != "wendy" for t in ws.captions(o).values()}
    assert counts["caption line"] == 6 and counts.get("sample caption", 0) == len(hers - shared) > 0
    assert not [b for b, what in found.blobs.items() if what == "sample caption" and b.decode() in shared]
    needles_path(ws, rev.request_id).unlink()


def test_cdm_init_makes_a_text_workspace_and_refuses_to_turn_a_class_one(tmp_path):
    from flows.cli import main as cli

    assert cli(["init", str(tmp_path / "t"), "--conditioning", "text"]) == 0
    assert Params.load(tmp_path / "t" / "params.yaml").data.conditioning == "text"
    for command in (["train"], ["compose"], ["sample", "--n", "2"], ["evaluate"]):  # not built for captions yet
        assert cli([*command, "--workspace", str(tmp_path / "t")]) == 2
    assert cli(["init", str(tmp_path / "c")]) == 0
    before = (tmp_path / "c" / "params.yaml").read_text()
    assert cli(["init", str(tmp_path / "c"), "--conditioning", "text"]) == 2
    assert (tmp_path / "c" / "params.yaml").read_text() == before
