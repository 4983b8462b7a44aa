"""Scale out with Dask: batch scoring and feature extraction over many machines.

Dask does the scheduling; this module only says what runs on each partition
(:mod:`skltransfer.scoring`'s robust chunk functions) and ships the model
to every worker once. Install with ``pip install skltransfer[dask]``.

>>> from distributed import Client                       # doctest: +SKIP
>>> import dask.dataframe as dd                           # doctest: +SKIP
>>> client = Client("tcp://scheduler:8786")               # doctest: +SKIP
>>> paths = dd.from_pandas(frame_of_paths, npartitions=64)  # doctest: +SKIP
>>> predictions = skltransfer.dask.predict(model, paths, top_k=3)  # doctest: +SKIP
>>> predictions.to_parquet("s3://bucket/predictions/")    # doctest: +SKIP

For ``GridSearchCV`` on a cluster, use joblib's Dask backend (no code here)::

    with joblib.parallel_backend("dask"):
        grid.fit(paths, y)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

try:
    import dask.dataframe as dd
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "skltransfer.dask needs Dask: pip install 'skltransfer[dask]'"
    ) from exc

from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

from .scoring import extract_chunk, prediction_columns, score_chunk

__all__ = ["extract", "extract_to_parquet", "predict", "share"]

PATH_COLUMN = "path"


def share(model: Any, client: Any = None) -> Any:
    """Ship ``model`` to every worker once; returns what to pass to partition functions.

    With a ``distributed`` client (given, or the current one) the model is
    scattered with ``broadcast=True``: each worker receives and unpickles it
    once, however many partitions it runs. With Dask's local schedulers the
    model is returned as is (same process, nothing to ship).
    """
    if client is None:
        try:
            from distributed import get_client

            client = get_client()
        except (ImportError, ValueError):
            return model
    return client.scatter(model, broadcast=True, hash=False)


def _as_path_frame(paths: Any) -> "dd.DataFrame":
    """A Dask DataFrame with one ``path`` column, from a DataFrame, Series or Bag of paths."""
    import dask.bag as db

    if isinstance(paths, db.Bag):
        return paths.map(lambda p: {PATH_COLUMN: str(p)}).to_dataframe(meta={PATH_COLUMN: "object"})
    if isinstance(paths, dd.Series):
        return paths.rename(PATH_COLUMN).to_frame()
    if isinstance(paths, dd.DataFrame):
        if PATH_COLUMN not in paths.columns:
            raise ValueError(f"the DataFrame needs a {PATH_COLUMN!r} column, has {list(paths.columns)}")
        return paths[[PATH_COLUMN]]
    raise TypeError(f"paths must be a Dask DataFrame, Series or Bag, got {type(paths).__name__}")


def _label_dtype(model: Any) -> Any:
    """A dtype for predicted labels that holds "no label" and writes to Parquet."""
    classes = getattr(model, "classes_", None)
    if classes is None or np.asarray(classes).dtype.kind in "OUS":
        return "string"
    kind = np.asarray(classes).dtype.kind
    return "Int64" if kind in "iub" else "float64"


def _prediction_meta(model: Any, top_k: int) -> pd.DataFrame:
    label = _label_dtype(model)
    dtypes = {}
    for column in prediction_columns(top_k):
        if column.startswith("probability"):
            dtypes[column] = "float64"
        elif column.startswith("prediction"):
            dtypes[column] = label
        else:
            dtypes[column] = "string"
    return pd.DataFrame({c: pd.Series(dtype=d) for c, d in dtypes.items()})


def _score_partition(part: pd.DataFrame, model: Any, top_k: int, meta: pd.DataFrame) -> pd.DataFrame:
    rows = score_chunk(model, part[PATH_COLUMN].astype(str).tolist(), top_k=top_k)
    frame = pd.DataFrame(rows, columns=prediction_columns(top_k), index=part.index)
    return frame.astype(meta.dtypes.to_dict())


def predict(model: Any, paths: Any, *, top_k: int = 1, client: Any = None) -> "dd.DataFrame":
    """Score paths with a fitted model, lazily, one chunk per partition.

    Parameters
    ----------
    model : fitted estimator
        A pipeline from ``PretrainedFeatures`` to a classifier (or anything
        with ``predict_proba`` / ``predict`` over image paths).
    paths : dask DataFrame (with a ``path`` column), dask Series or dask Bag
    top_k : int
        Ranked predictions per image.
    client : distributed.Client, optional
        Default: the current client, if any.

    Returns
    -------
    dask.dataframe.DataFrame
        Columns ``path, prediction, probability[, prediction_2, probability_2 ...], error``;
        an unreadable image gets an error row, the others are unaffected.
    """
    frame = _as_path_frame(paths)
    meta = _prediction_meta(model, top_k)
    return frame.map_partitions(_score_partition, share(model, client), top_k, meta, meta=meta)


def _extract_partition(part: pd.DataFrame, features: Any, columns: list[str]) -> pd.DataFrame:
    paths = part[PATH_COLUMN].astype(str).tolist()
    rows, good, errors = extract_chunk(features, paths)
    values = np.full((len(paths), len(columns)), np.nan, dtype=np.float32)
    if len(good):
        values[good] = rows
    out = pd.DataFrame(values, columns=columns, index=part.index)
    out.insert(0, PATH_COLUMN, pd.array(paths, dtype="string"))
    out["error"] = pd.array([errors.get(i) for i in range(len(paths))], dtype="string")
    return out


def extract(features: Any, paths: Any, *, client: Any = None) -> "dd.DataFrame":
    """Feature rows for paths, lazily: ``path``, one float32 column per feature, ``error``.

    ``features`` is a :class:`~skltransfer.PretrainedFeatures`, fitted or not
    (fitting reads no image). Unreadable images get NaN features and a reason.
    """
    frame = _as_path_frame(paths)
    try:
        check_is_fitted(features)
    except Exception:
        features = clone(features).fit(["(fit reads no image)"])
    columns = list(features.get_feature_names_out())
    meta = pd.DataFrame(
        {PATH_COLUMN: pd.Series(dtype="string")}
        | {column: pd.Series(dtype="float32") for column in columns}
        | {"error": pd.Series(dtype="string")}
    )
    return frame.map_partitions(_extract_partition, share(features, client), columns, meta=meta)


def extract_to_parquet(features: Any, paths: Any, path: str, *, client: Any = None, **to_parquet) -> None:
    """Compute features for ``paths`` and write them as a Parquet dataset at ``path``.

    One file per partition, written by the workers; keyword arguments go to
    ``dask.dataframe.DataFrame.to_parquet`` (``storage_options``, ...).
    """
    extract(features, paths, client=client).to_parquet(path, write_index=False, **to_parquet)

