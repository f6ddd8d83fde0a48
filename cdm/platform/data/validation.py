"""Validation of an ingestion batch with great-expectations, over a per-file table.

Each file of the source becomes one row (path, label folder, name, size, decodes, dimensions, mode, sha256, ...);
an expectation suite checks the rows; every failed row is reported with its file and a reason. A Data Docs site is
written when a folder is given.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cdm.data import sha256_bytes
from cdm.platform.data.sources import SourceFile

SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.png$"
METADATA_FILES = ("owner.yaml",)


@dataclass
class Limits:
    labels: Sequence[int]
    max_file_bytes: int
    min_dimension: int
    max_dimension: int
    max_files: int
    max_caption_chars: int = 200


@dataclass
class Problem:
    file: str
    reason: str


@dataclass
class ValidationReport:
    ok: bool
    files: int
    problems: list[Problem] = field(default_factory=list)
    docs: str | None = None  # Data Docs index.html

    def as_dict(self) -> dict:
        return {"ok": self.ok, "files": self.files, "docs": self.docs,
                "problems": [{"file": p.file, "reason": p.reason} for p in self.problems]}


def inspect_image(data: bytes, max_dimension: int) -> dict:
    """Decode check without trusting the file: dimensions are read from the header before any pixel is decoded."""
    from PIL import Image

    out = {"decodes": False, "decode_error": "", "width": 0, "height": 0, "mode": ""}
    try:
        with Image.open(io.BytesIO(data)) as im:
            out.update(width=im.width, height=im.height, mode=im.mode)
            if im.format != "PNG":
                out["decode_error"] = f"not a PNG (found {im.format})"
                return out
            if im.width > max_dimension or im.height > max_dimension:
                out["decode_error"] = f"dimensions {im.width}x{im.height} beyond the bound {max_dimension} (not decoded)"
                return out
            im.load()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # checksums of the chunks
        out["decodes"] = True
    except Image.DecompressionBombError as e:
        out["decode_error"] = f"decompression bomb: {e}"
    except Image.UnidentifiedImageError:
        out["decode_error"] = "not an image (unidentified format)"
    except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the file
        out["decode_error"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return out


def file_table(files: Sequence[SourceFile], limits: Limits):
    """One row per image file of the batch (metadata files such as owner.yaml are left out)."""
    import pandas as pd

    rows = []
    for f in files:
        if f.path in METADATA_FILES:
            continue
        parts = f.path.split("/")
        row = {"path": f.path, "label": parts[0] if len(parts) == 2 else "", "file_name": parts[-1],
               "depth": len(parts), "size_bytes": f.size, "read_problem": f.problem or "",
               "sha256": sha256_bytes(f.data) if f.data is not None else f"unread:{f.path}"}
        if f.data is not None:
            row.update(inspect_image(f.data, limits.max_dimension))
        else:
            row.update(decodes=False, decode_error=f.problem or "not read", width=0, height=0, mode="")
        rows.append(row)
    columns = ["path", "label", "file_name", "depth", "size_bytes", "read_problem", "sha256", "decodes",
               "decode_error", "width", "height", "mode"]
    return pd.DataFrame(rows, columns=columns)


def _reasons(expectation: str, column: str | None, row: dict, table, limits: Limits) -> str:
    """A human reason for a failed row."""
    if column == "read_problem":
        return row["read_problem"]
    if column == "file_name":
        return f"unsafe file name {row['file_name']!r} (allowed: letters, digits, '.', '_', '-', ending in .png)"
    if column == "depth":
        return "not in <label>/<file>.png layout"
    if column == "label":
        return f"label folder {row['label']!r} is not in the label set {list(limits.labels)}"
    if column == "size_bytes":
        return "empty file (0 bytes)" if row["size_bytes"] == 0 else f"file larger than {limits.max_file_bytes} bytes"
    if column == "decodes":
        return f"does not decode as a PNG image: {row['decode_error']}"
    if column in ("width", "height"):
        return (f"dimensions {row['width']}x{row['height']} outside "
                f"[{limits.min_dimension}, {limits.max_dimension}]")
    if column == "sha256":
        others = table[(table.sha256 == row["sha256"]) & (table.path != row["path"])].path.tolist()
        return f"duplicate content of {', '.join(others)}"
    return expectation


def _run_suite(table, expectations, docs_dir: str | Path | None, name: str, index_column: str):
    """Validate `table` against `expectations` with great-expectations; a Data Docs site when `docs_dir` is given.
    -> (GX validation result, docs index path or None)."""
    import logging

    import great_expectations as gx
    from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                            ProgressBarsConfig)

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # No default docs site: GX's ephemeral context would build one in a system temp folder (file names and sample
    # hashes of a rejected batch, outside the workspace, never purged); ours lives in the workspace (`docs_dir`).
    ctx = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False)))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = ctx.data_sources.add_pandas("owner_source").add_dataframe_asset("batch")
    batch = asset.add_batch_definition_whole_dataframe("all_files")
    suite = ctx.suites.add(gx.ExpectationSuite(name=name))
    for exp in expectations:
        suite.add_expectation(exp)
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(name="ingest", data=batch, suite=suite))
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": [index_column]}
    if docs_dir is None:
        return definition.run(batch_parameters={"dataframe": table}, result_format=result_format), None
    ctx.add_data_docs_site(site_name="cdm", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name="ingest", validation_definitions=[definition], result_format=result_format,
        actions=[gx.checkpoint.UpdateDataDocsAction(name="docs")]))
    run = checkpoint.run(batch_parameters={"dataframe": table})
    return next(iter(run.run_results.values())), str(Path(docs_dir) / "index.html")


def _file_expectations(limits: Limits, depth: int, labels: bool):
    import great_expectations as gx

    E = gx.expectations
    out = [
        E.ExpectTableRowCountToBeBetween(min_value=1, max_value=limits.max_files),
        E.ExpectColumnValuesToBeInSet(column="read_problem", value_set=[""]),
        E.ExpectColumnValuesToMatchRegex(column="file_name", regex=SAFE_NAME),
        E.ExpectColumnValuesToBeInSet(column="depth", value_set=[depth]),
        E.ExpectColumnValuesToBeBetween(column="size_bytes", min_value=1, max_value=limits.max_file_bytes),
        E.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]),
        E.ExpectColumnValuesToBeBetween(column="width", min_value=limits.min_dimension, max_value=limits.max_dimension),
        E.ExpectColumnValuesToBeBetween(column="height", min_value=limits.min_dimension,
                                        max_value=limits.max_dimension),
        E.ExpectColumnValuesToBeUnique(column="sha256"),
    ]
    if labels:
        out.append(E.ExpectColumnValuesToBeInSet(column="label", value_set=[str(v) for v in limits.labels]))
    return out


def validate_batch(files: Sequence[SourceFile], limits: Limits, docs_dir: str | Path | None = None) -> ValidationReport:
    """Run the ingestion suite over `files`. The batch is accepted only when every expectation holds."""
    table = file_table(files, limits)
    result, docs = _run_suite(table, _file_expectations(limits, depth=2, labels=True), docs_dir, "cdm_ingestion",
                              "path")
    return _report(result, table, limits, docs)


def _report(result, table, limits: Limits, docs: str | None, layout: str = "not in <label>/<file>.png layout",
            extra: list[Problem] | None = None, ok: bool = True) -> ValidationReport:
    problems: dict[tuple[str, str], Problem] = {}
    records = table.set_index("path", drop=False)
    for r in result.results:
        if r.success:
            continue
        column = r.expectation_config.kwargs.get("column")
        if column is None:  # table-level: row count
            observed = r.result.get("observed_value")
            reason = "no samples in the batch" if not observed else f"{observed} files exceed {limits.max_files}"
            problems[("<batch>", reason)] = Problem("<batch>", reason)
            continue
        for hit in r.result.get("unexpected_index_list") or []:
            row = records.loc[hit["path"]].to_dict()
            if column != "read_problem" and row["read_problem"]:
                continue  # one reason per unread file is enough
            if column in ("width", "height") and not row["decodes"]:
                continue  # the decode reason says it
            if column == "decodes" and row["size_bytes"] == 0:
                continue  # "empty file" says it
            if column == "label" and row["depth"] != 2:
                continue  # the layout reason says it
            reason = layout if column == "depth" else _reasons(r.expectation_config.type, column, row, table, limits)
            problems.setdefault((row["path"], reason), Problem(row["path"], reason))
    for p in extra or []:
        problems.setdefault((p.file, p.reason), p)
    ordered = sorted(problems.values(), key=lambda p: (p.file, p.reason))
    return ValidationReport(ok=result.success and ok, files=len(table), problems=ordered, docs=docs)


def caption_table(files: Sequence[SourceFile], limits: Limits):
    """One row per `metadata.jsonl` line and per image without one: file_name, line, problem ('' when the line
    is an acceptable caption), has_image, captioned (how many lines name the file)."""
    import pandas as pd

    from cdm.text.captions import METADATA, parse_metadata

    meta = next((f for f in files if f.path == METADATA), None)
    images = {f.path for f in files if f.path not in (METADATA, *METADATA_FILES)}
    lines = parse_metadata(meta.data if meta is not None else None, limits.max_caption_chars)
    if meta is not None and meta.data is None:
        lines = [{"line": 0, "file_name": "", "text": "", "problem": meta.problem or "metadata.jsonl not read"}]
    named = [r["file_name"] for r in lines]
    rows = [{"key": f"{METADATA}:{r['line']}", "file_name": r["file_name"], "line": r["line"],
             "problem": r["problem"], "has_image": (r["file_name"] in images) or bool(r["problem"]),
             "captioned": named.count(r["file_name"]) if not r["problem"] else 1} for r in lines]
    rows += [{"key": name, "file_name": name, "line": 0, "problem": "", "has_image": True, "captioned": 0}
             for name in sorted(images - set(named))]
    return pd.DataFrame(rows, columns=["key", "file_name", "line", "problem", "has_image", "captioned"])


def validate_captioned_batch(files: Sequence[SourceFile], limits: Limits,
                             docs_dir: str | Path | None = None) -> ValidationReport:
    """The ingestion suite of a text workspace: the image files (flat, beside `metadata.jsonl`) as
    `validate_batch` checks them, and the captions: every image has exactly one caption and every caption an image;
    captions non-empty, valid UTF-8, no control characters, at most `limits.max_caption_chars`."""
    import great_expectations as gx

    from cdm.text.captions import METADATA

    images = [f for f in files if f.path != METADATA]
    table = file_table(images, limits)
    result, docs = _run_suite(table, _file_expectations(limits, depth=1, labels=False), docs_dir,
                              "cdm_ingestion", "path")
    captions = caption_table(files, limits)
    E = gx.expectations
    extra: list[Problem] = []
    if not any(f.path == METADATA for f in files):
        extra.append(Problem(METADATA, "missing: a captioned batch has one metadata.jsonl beside its images"))
    c_result, _ = _run_suite(captions, [
        E.ExpectColumnValuesToBeInSet(column="problem", value_set=[""]),
        E.ExpectColumnValuesToBeInSet(column="has_image", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="captioned", value_set=[1]),
    ], None if docs_dir is None else Path(docs_dir) / "captions", "cdm_captions", "key")
    rows = captions.set_index("key", drop=False)
    for r in c_result.results:
        if r.success:
            continue
        column = r.expectation_config.kwargs.get("column")
        for hit in r.result.get("unexpected_index_list") or []:
            row = rows.loc[hit["key"]].to_dict()
            where = f"{METADATA} line {row['line']}" if row["line"] else (row["file_name"] or METADATA)
            if column == "problem":
                extra.append(Problem(where, row["problem"]))
            elif column == "has_image":
                extra.append(Problem(where, f"captions {row['file_name']!r}, which is not in the batch"))
            elif row["captioned"] == 0:
                extra.append(Problem(where, f"no caption in {METADATA}"))
            else:
                extra.append(Problem(where, f"{row['file_name']!r} is captioned {row['captioned']} times"))
    return _report(result, table, limits, docs, layout="not flat beside metadata.jsonl (<file>.png)", extra=extra,
                   ok=c_result.success and not any(p.file == METADATA and p.reason.startswith("missing")
                                                   for p in extra))
