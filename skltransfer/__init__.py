"""skltransfer: transfer learning for images as first-class scikit-learn estimators.

>>> from sklearn.pipeline import make_pipeline
>>> from sklearn.linear_model import LogisticRegression
>>> from skltransfer import PretrainedFeatures
>>> clf = make_pipeline(PretrainedFeatures(), LogisticRegression(max_iter=1000))
"""

from .backbones import load_backbone
from .registry import clear_shared_backbones
from .weights import BackboneUnavailableError, WeightsMismatchError, offline_backbones
from .cache import CacheInfo, FeatureCache
from .datasets import load_image_folder, stable_train_test_split
from .decoding import ImageFailure, ImageLoadError
from .features import PretrainedFeatures
from .finetune import FineTuneClassifier
from .persistence import UnsafeModelError, load, save

__version__ = "0.1.0"

__all__ = [
    "BackboneUnavailableError",
    "CacheInfo",
    "FeatureCache",
    "FineTuneClassifier",
    "ImageFailure",
    "ImageLoadError",
    "PretrainedFeatures",
    "UnsafeModelError",
    "WeightsMismatchError",
    "__version__",
    "clear_shared_backbones",
    "load",
    "load_backbone",
    "load_image_folder",
    "offline_backbones",
    "save",
    "stable_train_test_split",
]
