"""Captioned batches in Hugging Face's imagefolder layout: PNG files beside a `metadata.jsonl` holding one
`{"file_name": ..., "text": ...}` per image (what `datasets.load_dataset("imagefolder")` and diffusers'
text-to-image scripts read).

`caption_table` turns a batch's files into one row per image *and* one row per metadata line, so that the
great-expectations suite (`cdm.platform.data.validation.validate_captioned_batch`) can refuse every kind of mismatch
by name: an image without a caption, a caption without an image, a file captioned twice, an empty, over-long or
control-character caption, a line that is not JSON.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

METADATA = "metadata.jsonl"


@dataclass
class CaptionedDataset:
    """Images and their captions in memory; `ids` are the content hashes (sha256 of the PNG files)."""

    x: torch.Tensor  # [N, 3, H, W] float32 in [-1, 1]
    captions: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> "CaptionedDataset":
        import torch

        index = list(index)
        return CaptionedDataset(self.x[torch.as_tensor(index, dtype=torch.long)],
                                [self.captions[i] for i in index], [self.ids[i] for i in index])

    @staticmethod
    def concat(parts: Sequence["CaptionedDataset"]) -> "CaptionedDataset":
        import torch

        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("no samples to concatenate")
        return CaptionedDataset(torch.cat([p.x for p in parts]), sum((p.captions for p in parts), []),
                                sum((p.ids for p in parts), []))


def caption_problem(text: object, max_chars: int) -> str:
    """Why `text` is not an acceptable caption ('' when it is)."""
    if not isinstance(text, str):
        return f"caption is not a string ({type(text).__name__})"
    if not text.strip():
        return "empty caption"
    if len(text) > max_chars:
        return f"caption of {len(text)} characters exceeds data.max_caption_chars = {max_chars}"
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")), None)
    if bad is not None:
        return f"caption holds a control or unassigned character (U+{ord(bad):04X})"
    return ""


def parse_metadata(data: bytes | None, max_chars: int) -> list[dict]:
    """The lines of `metadata.jsonl`, each {line, file_name, text, problem}: '' problem when the line is a JSON
    object with a string `file_name` and an acceptable `text`."""
    if data is None:
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [{"line": 0, "file_name": "", "text": "", "problem": f"metadata.jsonl is not valid UTF-8 ({e.reason} "
                                                                   f"at byte {e.start})"}]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = {"line": n, "file_name": "", "text": "", "problem": ""}
        try:
            entry = json.loads(line)
        except ValueError:
            rows.append({**row, "problem": "not a JSON object"})
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or "text" not in entry:
            rows.append({**row, "problem": 'expected {"file_name": "...", "text": "..."}'})
            continue
        problem = caption_problem(entry["text"], max_chars)
        rows.append({**row, "file_name": entry["file_name"], "text": entry["text"] if not problem else "",
                     "problem": problem})
    return rows


def read_imagefolder(root: str | Path) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """A validated imagefolder on disk (an owner's committed folder): [(file name, png bytes)] and
    {file name: caption}."""
    root = Path(root)
    captions = {}
    for line in (root / METADATA).read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            captions[entry["file_name"]] = entry["text"]
    files = [(name, (root / name).read_bytes()) for name in sorted(captions)]
    return files, captions


def load_imagefolder(root: str | Path, image_size: int) -> CaptionedDataset:
    """An imagefolder as a `CaptionedDataset` (RGB, `image_size`), in file-name order."""
    import torch

    from cdm.data import load_image_bytes, sha256_bytes

    files, captions = read_imagefolder(root)
    if not files:
        raise ValueError(f"{root}: no captioned images")
    x = torch.stack([load_image_bytes(data, image_size, 3) for _, data in files])
    return CaptionedDataset(x, [captions[name] for name, _ in files], [sha256_bytes(d) for _, d in files])


def write_imagefolder(images: Sequence[bytes], captions: Sequence[str], root: str | Path) -> Path:
    """PNG files `<sha256[:16]>.png` and their `metadata.jsonl` (sorted by file name) under `root`."""
    from cdm.data import sha256_bytes

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    entries = {}
    for data, text in zip(images, captions, strict=True):
        name = f"{sha256_bytes(data)[:16]}.png"
        (root / name).write_bytes(data)
        entries[name] = text
    lines = [json.dumps({"file_name": n, "text": entries[n]}, ensure_ascii=False) for n in sorted(entries)]
    (root / METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
