"""Scoring and extracting images in chunks, robustly, with flat memory.

One job: push a stream of image paths through a fitted model (or a
features transformer) a chunk at a time, turning unreadable images into
error rows instead of failures, and writing rows as they come. The command
line and :mod:`skltransfer.dask` both use it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import iter_image_files
from .decoding import ImageLoadError

__all__ = [
    "expand_image_paths",
    "extract_chunk",
    "open_row_writer",
    "prediction_columns",
    "score_chunk",
]


def expand_image_paths(sources: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yield image paths: files as given, folders walked (sorted, hidden skipped).

    Files named explicitly are yielded whatever their ending (a bad one
    becomes an error row); inside folders only image endings count.
    """
    for source in sources:
        source = os.fspath(source)
        if os.path.isdir(source):
            yield from iter_image_files(source)
        else:
            yield source


def chunked(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of up to ``size`` consecutive items."""
    chunk: list[Any] = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prediction_columns(top_k: int) -> list[str]:
    """Flat column names of prediction rows: path, prediction, probability, ranks 2..k, error."""
    columns = ["path", "prediction", "probability"]
    for rank in range(2, top_k + 1):
        columns += [f"prediction_{rank}", f"probability_{rank}"]
    return columns + ["error"]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _guarded(model: Any, method: str, paths: Sequence[str]):
    """Run ``model.<method>(paths)``; on unreadable images, finish with the readable ones.

    Returns ``(result or None, positions that succeeded, {position: reason})``.
    Nothing is computed twice: the error carries what the model computed for
    the good images (its ``rows``), and the rest of the model runs on those.
    Only a model whose image stage this module does not know is run again on
    the good images.
    """
    try:
        return getattr(model, method)(list(paths)), list(range(len(paths))), {}
    except ImageLoadError as exc:
        errors = {f.index: f.reason for f in exc.failures}
        rows = exc.rows
    good = [i for i in range(len(paths)) if i not in errors]
    if not good:
        return None, [], errors
    finish = _after_the_images(model, method)
    if rows is not None and finish is not None:
        return finish(rows[good]), good, errors
    return getattr(model, method)([paths[i] for i in good]), good, errors


def _after_the_images(model: Any, method: str):
    """What ``model.<method>`` does with the rows its image stage computed, or None if unknown.

    The model says so itself (``from_logits(rows, method)``: a fine-tuned
    classifier, an exported ONNX model, ``PretrainedFeatures``); a pipeline
    whose first step says so hands the rows to the rest. No estimator is
    imported here, so that scoring an ONNX file needs no torch.
    """
    if hasattr(model, "from_logits"):
        return lambda rows: model.from_logits(rows, method)
    steps = getattr(model, "steps", None)
    if steps and hasattr(steps[0][1], "from_logits"):
        if len(steps) == 1:
            return _after_the_images(steps[0][1], method)
        return lambda rows: getattr(model[1:], method)(rows)
    return None


def score_chunk(model: Any, paths: Sequence[str], top_k: int = 1) -> list[dict[str, Any]]:
    """Predict a chunk; one row per path, in order, unreadable images as error rows.

    Uses ``predict_proba`` when the model has it (then ``top_k`` ranks, with
    probabilities), else ``predict``.
    """
    has_proba = hasattr(model, "predict_proba")
    result, good, errors = _guarded(model, "predict_proba" if has_proba else "predict", paths)
    rows: list[dict[str, Any]] = []
    by_position = {}
    if result is not None:
        if has_proba:
            classes = model.classes_
            k = min(top_k, len(classes))
            order = np.argsort(-result, axis=1, kind="stable")[:, :k]
            for row_index, position in enumerate(good):
                ranked = [(_plain(classes[c]), float(result[row_index, c])) for c in order[row_index]]
                by_position[position] = ranked
        else:
            for row_index, position in enumerate(good):
                by_position[position] = [(_plain(result[row_index]), math.nan)]
    for position, path in enumerate(paths):
        row: dict[str, Any] = {"path": os.fspath(path)}
        ranked = by_position.get(position, [])
        for rank in range(1, top_k + 1):
            label, probability = ranked[rank - 1] if rank <= len(ranked) else (None, math.nan)
            suffix = "" if rank == 1 else f"_{rank}"
            row[f"prediction{suffix}"] = label
            row[f"probability{suffix}"] = probability
        row["error"] = errors.get(position)
        rows.append(row)
    return rows


def extract_chunk(features: Any, paths: Sequence[str]) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Features of a chunk: ``(rows of the readable images, their positions, {position: reason})``."""
    result, good, errors = _guarded(features, "transform", paths)
    if result is None:
        width = getattr(features, "n_features_out_", 0)
        result = np.empty((0, width), dtype=np.float32)
    return np.asarray(result, dtype=np.float32), good, errors


# -- writers ----------------------------------------------------------------------


class _CsvWriter:
    def __init__(self, handle, columns):
        self._handle = handle
        self._writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        self._writer.writeheader()

    def write(self, rows):
        for row in rows:
            self._writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                                   for k, v in row.items()})
        self._handle.flush()

    def close(self):
        if self._handle is not None and self._handle.name != "<stdout>":
            self._handle.close()


class _JsonlWriter:
    def __init__(self, handle):
        self._handle = handle

    def write(self, rows):
        for row in rows:
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            self._handle.write(json.dumps(clean, default=str) + "\n")
        self._handle.flush()

    def close(self):
        self._handle.close()


class _ParquetWriter:
    def __init__(self, path: Path, columns):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError(
                "writing .parquet needs pyarrow: pip install pyarrow (or skltransfer[dask])"
            ) from None
        self._path = path
        self._columns = columns
        self._writer = None

    def write(self, rows):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return
        table = pa.Table.from_pylist([{c: row.get(c) for c in self._columns} for row in rows])
        if self._writer is None:
            schema = pa.schema(
                [
                    pa.field(name, pa.string() if field.type == pa.null() else field.type)
                    for name, field in zip(table.schema.names, table.schema)
                ]
            )
            self._schema = schema
            self._writer = pq.ParquetWriter(self._path, schema)
        self._writer.write_table(table.cast(self._schema))

    def close(self):
        if self._writer is not None:
            self._writer.close()


def open_row_writer(out: str | os.PathLike | None, columns: list[str]):
    """A streaming writer for rows (dicts keyed by ``columns``) by the file's ending.

    ``.csv``, ``.jsonl`` or ``.parquet``; ``None``: CSV on stdout.
    """
    import sys

    if out is None:
        return _CsvWriter(sys.stdout, columns)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _CsvWriter(open(path, "w", newline="", encoding="utf-8"), columns)
    if suffix in (".jsonl", ".ndjson"):
        return _JsonlWriter(open(path, "w", encoding="utf-8"))
    if suffix == ".parquet":
        return _ParquetWriter(path, columns)
    raise ValueError(f"unsupported output {path.name!r}: use .csv, .jsonl or .parquet")
