"""skltransfer: transfer learning for images as first-class scikit-learn estimators.

>>> from sklearn.pipeline import make_pipeline
>>> from sklearn.linear_model import LogisticRegression
>>> from skltransfer import PretrainedFeatures
>>> clf = make_pipeline(PretrainedFeatures(), LogisticRegression(max_iter=1000))

The public names are imported on first use (PEP 562), so that scoring an
exported model (:mod:`skltransfer.serving`) works where torch is not installed.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("skltransfer")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: public name -> the module that defines it
_WHERE = {
    "BackboneUnavailableError": "weights",
    "CacheInfo": "cache",
    "ExportError": "exporting",
    "FeatureCache": "cache",
    "FineTuneClassifier": "finetune",
    "ImageFailure": "decoding",
    "ImageLoadError": "decoding",
    "OnnxModel": "serving",
    "PretrainedFeatures": "features",
    "SharedCacheWarning": "cache",
    "UnsafeModelError": "persistence",
    "WeightsMismatchError": "weights",
    "clear_shared_backbones": "registry",
    "export": "exporting",
    "load": "persistence",
    "load_backbone": "backbones",
    "load_image_folder": "datasets",
    "offline_backbones": "weights",
    "save": "persistence",
    "stable_train_test_split": "datasets",
}

__all__ = sorted([*_WHERE, "__version__"])


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # once: the next lookup is a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
