"""The captioned batch suite (great-expectations): one bad entry refuses the batch and names the file or line."""

import json

import pytest

from cdm.platform.data.sources import SourceFile
from cdm.platform.data.validation import Limits, validate_captioned_batch
from cdm.text.digits import Domain, caption, glyph_pools, make_scenes, png_rgb, render_all

LIMITS = Limits(labels=[], max_file_bytes=100_000, min_dimension=4, max_dimension=1024, max_files=100,
                max_caption_chars=60)


@pytest.fixture(scope="module")
def batch():
    scenes = make_scenes(4, Domain(), seed=0)
    images = render_all(scenes, glyph_pools(), seed=0)
    return [(f"img{i}.png", png_rgb(im), caption(sc)) for i, (im, sc) in enumerate(zip(images, scenes))]


def files_of(images, lines):
    out = [SourceFile(name, data, len(data)) for name, data in images]
    if lines is not None:
        blob = "\n".join(lines).encode() if isinstance(lines, list) else lines
        out.append(SourceFile("metadata.jsonl", blob, len(blob)))
    return out


def entry(name, text):
    return json.dumps({"file_name": name, "text": text})


def test_a_good_batch_passes(batch):
    report = validate_captioned_batch(files_of([(n, d) for n, d, _ in batch], [entry(n, t) for n, _, t in batch]),
                                      LIMITS)
    assert report.ok, report.problems
    assert report.files == 4


@pytest.mark.parametrize("case, where, reason", [
    ("missing", "img3.png", "no caption"),
    ("extra", "metadata.jsonl line 5", "not in the batch"),
    ("duplicate", "metadata.jsonl line 1", "captioned 2 times"),
    ("empty", "metadata.jsonl line 1", "empty caption"),
    ("long", "metadata.jsonl line 1", "exceeds data.max_caption_chars"),
    ("control", "metadata.jsonl line 1", "control"),
    ("not json", "metadata.jsonl line 1", "not a JSON object"),
    ("no metadata", "metadata.jsonl", "missing"),
    ("not utf-8", "metadata.jsonl", "not valid UTF-8"),
])
def test_one_bad_entry_refuses_the_batch(batch, case, where, reason):
    images = [(n, d) for n, d, _ in batch]
    lines = [entry(n, t) for n, _, t in batch]
    if case == "missing":
        lines = lines[:3]
    elif case == "extra":
        lines.append(entry("ghost.png", "a red 1 on the left"))
    elif case == "duplicate":
        lines.append(entry("img0.png", "a blue 2 on the right"))
    elif case == "empty":
        lines[0] = entry("img0.png", "  ")
    elif case == "long":
        lines[0] = entry("img0.png", "a red 3 on the left " * 4)
    elif case == "control":
        lines[0] = entry("img0.png", "a red 3\x07 on the left")
    elif case == "not json":
        lines[0] = "{file_name: img0.png"
    elif case == "no metadata":
        lines = None
    elif case == "not utf-8":
        lines = b'{"file_name": "img0.png", "text": "\xff"}'
    report = validate_captioned_batch(files_of(images, lines), LIMITS)
    assert not report.ok
    assert any(p.file == where and reason in p.reason for p in report.problems), report.problems


def test_a_caption_never_reaches_the_report(batch):
    """Captions are owner data: the report names files and lines, not what they say."""
    images = [(n, d) for n, d, _ in batch]
    lines = [entry(n, t) for n, _, t in batch] + [entry("ghost.png", "a secret caption")]
    report = validate_captioned_batch(files_of(images, lines), LIMITS)
    assert not report.ok and "secret" not in json.dumps(report.as_dict())
