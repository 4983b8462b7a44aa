"""Saving fitted models in a format that runs no code when loaded.

One job: write a fitted model to one file and read it back, refusing anything
a skltransfer model does not hold. ``joblib`` / ``pickle`` files run whatever
code they contain when loaded: only load those from sources you trust.

The format is a `skops <https://skops.readthedocs.io>`_ archive (``skops.io``):
a zip of a JSON description of the objects plus ``.npy`` arrays, read back
without unpickling. Objects are rebuilt only for types on an allow-list:
scikit-learn's and NumPy's (skops's defaults) and skltransfer's own
estimators. A fine-tuned network's weights are stored as plain arrays and the
architecture is rebuilt from its name.

What the format cannot hold is refused when saving, naming the parameter: a
backbone given as an ``nn.Module`` object, a callable ``augment``, or any
other object outside the allow-list (save those with ``joblib`` and keep the
file where only you can write it).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["UnsafeModelError", "load", "save"]

#: skltransfer's own types that may be rebuilt from a file (beyond skops's defaults).
TRUSTED_TYPES = frozenset({
    "skltransfer.features.PretrainedFeatures",
    "skltransfer.finetune.FineTuneClassifier",
    "skltransfer.preprocessing.Preprocessing",
    "skltransfer.quantization.Calibration",
    "skltransfer.cache.CacheInfo",
    "skltransfer.cache.FeatureCache",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
})


class UnsafeModelError(ValueError):
    """A model cannot be written to, or read from, the safe format."""


def save(model: Any, path: str | os.PathLike) -> None:
    """Write a fitted model to ``path`` in a format that runs no code on load.

    Parameters
    ----------
    model : estimator
        A fitted pipeline of :class:`~skltransfer.PretrainedFeatures` and
        scikit-learn steps, a :class:`~skltransfer.FineTuneClassifier`, or any
        scikit-learn estimator.
    path : str or PathLike
        Where to write (conventionally ``*.skops``).

    Raises
    ------
    UnsafeModelError
        If the model holds something the format cannot rebuild safely, naming
        the parameter (or the type) and what to do instead.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skltransfer import PretrainedFeatures, save, load
    >>> X = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    >>> clf = make_pipeline(PretrainedFeatures("test_efficientnet", weights=None, cache=None),
    ...                     LogisticRegression()).fit(X, [0, 1] * 3)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.skops")
    >>> save(clf, path)
    >>> bool((load(path).predict(X) == clf.predict(X)).all())
    True
    """
    import skops.io as sio

    _refuse_what_cannot_be_rebuilt(model)
    try:
        data = sio.dumps(model)
    except Exception as exc:  # skops names what it could not describe
        raise UnsafeModelError(f"the model cannot be written in the safe format: {exc}") from exc
    unknown = sorted(set(sio.get_untrusted_types(data=data)) - TRUSTED_TYPES)
    if unknown:
        raise UnsafeModelError(
            f"the model holds objects of types the safe format does not rebuild: {', '.join(unknown)}. "
            "Save it with joblib instead, and load that file only from a source you trust."
        )
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, target)


def load(path: str | os.PathLike) -> Any:
    """Read a model written by :func:`save`; nothing in the file is run.

    Raises
    ------
    UnsafeModelError
        If the file is not such an archive (a joblib or pickle file, say), or
        if it describes objects of any type outside the allow-list: the error
        lists them, and nothing from the file has been built.
    FileNotFoundError
        If there is no such file.
    """
    import skops.io as sio

    data = Path(path).read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise UnsafeModelError(
            f"{os.fspath(path)}: not a model written by skltransfer.save (a .skops archive). If it is a "
            "joblib or pickle file, loading it runs any code it holds: use joblib.load only on files "
            "from a source you trust."
        )
    try:
        found = set(sio.get_untrusted_types(data=data))
    except Exception as exc:
        raise UnsafeModelError(f"{os.fspath(path)}: not a readable model archive ({exc})") from None
    refused = sorted(found - TRUSTED_TYPES)
    if refused:
        raise UnsafeModelError(
            f"{os.fspath(path)}: refused: the file describes objects of types a skltransfer model does "
            f"not hold: {', '.join(refused)}. Nothing from it was built."
        )
    return sio.loads(data, trusted=sorted(found))


def _refuse_what_cannot_be_rebuilt(model: Any) -> None:
    """Name the parameters the format cannot hold, before skops tries (its message would be obscure)."""
    from torch import nn

    from .features import PretrainedFeatures
    from .finetune import FineTuneClassifier

    for name, step in _estimators(model):
        if isinstance(step, (PretrainedFeatures, FineTuneClassifier)) and isinstance(step.backbone, nn.Module):
            raise UnsafeModelError(
                f"{name}backbone is an nn.Module object; the safe format rebuilds backbones from their "
                "timm or torchvision names. Save this model with joblib (trusted use only)."
            )
        if isinstance(step, FineTuneClassifier) and callable(step.augment) and not isinstance(step.augment, bool):
            raise UnsafeModelError(
                f"{name}augment is a callable; the safe format holds no code. Use a preset "
                "(augment='auto', 'flip', 'noflip' or 'none'), or save with joblib (trusted use only)."
            )


def _estimators(model: Any, prefix: str = ""):
    """(parameter prefix, estimator) for the model and every estimator among its parameters."""
    yield prefix, model
    if hasattr(model, "get_params"):
        for key, value in model.get_params(deep=False).items():
            if hasattr(value, "get_params") and not isinstance(value, type):
                yield from _estimators(value, f"{prefix}{key}__")
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, tuple) and len(item) >= 2 and hasattr(item[1], "get_params"):
                        yield from _estimators(item[1], f"{prefix}{item[0]}__")
