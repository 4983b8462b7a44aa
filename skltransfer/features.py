"""``PretrainedFeatures``: a scikit-learn transformer from images to features.

The estimator is thin: it validates its parameters and calls the stages
(:mod:`~skltransfer.backbones` for the model, :mod:`~skltransfer.decoding`
for inputs, :mod:`~skltransfer.inference` for batches on a device).
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import nullcontext
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .backbones import Backbone
from .cache import CacheInfo, FeatureCache, as_feature_cache, cached_features, feature_config_id
from .decoding import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, as_image_items
from .engines import ENGINES, resolve_engine
from .inference import extract_features
from .pooling import POOLINGS
from .quantization import calibrate_backbone, full_range_int8
from .preprocessing import CROP_POLICIES, MIN_INPUT_SIZE, check_input_size
from .registry import model_identity, shared_backbone
from .runtime import FEATURE_PRECISIONS, all_cores, resolve_batch_size, resolve_device, resolve_num_workers, resolve_precision
from .weights import WeightsMismatchError

__all__ = ["PretrainedFeatures"]


class PretrainedFeatures(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Image features from a pretrained backbone, as a scikit-learn transformer.

    Each input image becomes one row: the globally pooled last feature map of
    a pretrained network (timm or torchvision), preprocessed exactly as the
    network's weights expect. Put a scikit-learn classifier after it in a
    :class:`~sklearn.pipeline.Pipeline` to get an image classifier.

    The model is built on first use, once per process: clones made by
    ``GridSearchCV`` or ``clone`` share it. Pickling stores the
    configuration and a fingerprint of the weights, not the weights.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="tf_efficientnet_lite0"
        A timm model name, pretrained tag allowed (``"resnet50.a1_in1k"``);
        ``"torchvision:<name>"`` for a torchvision classification model
        (``"torchvision:resnet50"``); or a module mapping a normalised image
        batch to features (4-D outputs are pooled). The default's ImageNet
        weights ship with the package: it works with no network.
    weights : "pretrained", None or path, default="pretrained"
        ``"pretrained"``: the backbone's published weights (packaged for
        ``tf_efficientnet_lite0/1/2``, downloaded and cached by timm or
        torchvision otherwise). ``None``: random initialisation with a fixed
        seed (for tests and experiments). A path: a local ``.pth``, ``.pt`` or
        ``.safetensors`` state dict with timm or torchvision key names, bare
        or wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``; its
        classifier may have any number of classes (it is dropped). Ignored
        when ``backbone`` is a module.
    pooling : {"avg", "max", "avgmax", "catavgmax", "gem"}, default="avg"
        Global pooling of each feature map. ``"catavgmax"`` concatenates
        average and max (twice the width); ``"gem"`` is the generalised mean
        (p = 3). torchvision backbones: ``"avg"``.
    crop : {"auto", "center", "none", "pad"}, default="auto"
        How an image is brought to the model's input size. ``"center"``: the
        model's own resize and centre crop (timm's eval transform).
        ``"none"``: resized to the input size, nothing cut (aspect not kept).
        ``"pad"``: long side resized, padded with the mean colour (aspect
        kept). ``"auto"``: ``"none"`` for images smaller than the input on
        both sides (small images have no border to spare), ``"center"`` for
        the rest.
    input_size : None, int or (height, width), default=None
        The size the network sees. ``None``: the size its weights were
        trained at (224 for EfficientNet-Lite0). A smaller size is
        proportionally faster (128 is about a third of the compute of 224)
        and can suit images much smaller than the input, which are scaled up
        anyway; features at another size are not those the weights were
        trained for, so measure before you trade. At least 32.
    layers : "final", "all" or list of int, default="final"
        Feature maps to pool and concatenate (timm backbones): the stage
        outputs followed by the final map; ``-1`` is the final map,
        ``[-3, -2, -1]`` adds the two stages before it, ``"all"`` takes all.
        Earlier stages carry less ImageNet-specific detail (textures, small
        objects).
    tta : None or "flip", default=None
        ``"flip"`` averages the features of each image and its mirror image
        (twice the compute).
    batch_size : int or "auto", default="auto"
        Images per forward pass. ``"auto"``: on CPU, 6 at 224 x 224 (fewer
        for larger inputs: larger batches are slower there, their
        activations fall out of the CPU's caches), 64 on CUDA.
    device : str, default="auto"
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``. Resolved at transform time, so a model fitted on a GPU
        machine transforms on a CPU-only one.
    precision : {"auto", "float32", "bfloat16", "float16", "int8"}, default="auto"
        Precision of the forward pass. ``"auto"``: float32 on CPU; on CUDA
        bfloat16 autocast where the GPU supports it, else float16 (features
        within cosine 0.99 of float32, tensor cores at full speed).
        ``"bfloat16"`` on the CPU needs native bfloat16 (AVX-512 BF16 or
        AMX) and is refused without it. ``"int8"`` (CPU; needs ONNX
        Runtime, the ``export`` extra): ``fit`` calibrates the network on
        up to 300 of its images and quantises it
        (:mod:`skltransfer.quantization`), and ``transform`` runs the int8
        network with ONNX Runtime; measure its accuracy on your images
        before you ship it (docs: "int8 batch scoring"). Part of the cache
        key: rows computed at one precision (or calibration) are not
        served for another.
    engine : {"auto", "torch", "openvino"}, default="auto"
        What runs the model. ``"openvino"``: the model converted by OpenVINO
        and compiled for this CPU (about 1.8x eager torch on 2 cores, float32
        features within 2e-7 of torch's); the conversion is kept in the
        cache folder. ``"torch"``: eager PyTorch. ``"auto"``: OpenVINO on the
        CPU when installed (float32 and bfloat16) for a named backbone, torch
        otherwise: on CUDA, and for your own module (converting traces its
        ``forward``). A backbone that does not convert runs with torch after one
        :class:`~skltransfer.engines.EngineFallbackWarning`. float32 rows are
        the same numbers from either engine and share cache entries;
        16-bit rows do not.
    num_workers : int or "auto", default="auto"
        Processes decoding images in parallel (0: in this process).
        ``"auto"``: 0 on the CPU (the model already uses every core; worker
        processes measured slower on 2 cores), one per spare core (at most 8)
        on CUDA.
    max_image_pixels : int or None, default=178_956_970
        Images with more pixels are refused, from their headers, before any
        pixel is decoded: an error naming the file, its size and this limit
        (the other images are still computed and cached). The default is
        where Pillow raises ``DecompressionBombError``. ``None``: no limit
        (only for trusted images).
    verbose : bool, default=False
        Show a progress bar during ``transform``.
    cache : "auto", path, URL, FeatureCache or None, default="auto"
        Where computed features are kept so that no image goes through the
        same backbone twice, across folds, processes, runs and (with a
        shared store) machines. ``"auto"``: the folder
        ``$SKLTRANSFER_CACHE_DIR`` if set, else ``~/.cache/skltransfer``,
        in front of the store ``$SKLTRANSFER_CACHE_URL`` if that is set. A
        path: that folder. An fsspec URL (``"s3://bucket/prefix"``): that
        store, shared by every machine, behind the default folder. A
        :class:`~skltransfer.FeatureCache`: its folder, store and size
        limit. ``None``: no cache. Entries are keyed by image content and
        feature configuration, never by file name or object.

    Attributes
    ----------
    n_features_out_ : int
        Width of a feature row.
    backbone_digest_ : str
        Fingerprint of the weights seen at ``fit``. ``transform`` refuses to
        run if the weights behind the same name have changed since.
    preprocessing_ : Preprocessing
        Input size, crop, interpolation, mean and std used for every image.
    feature_groups_ : tuple of (str, int)
        The feature maps behind the columns, in order, with their widths.
    cache_info_ : CacheInfo
        Hits, misses and seconds of the last ``transform`` (set by it).
    calibration_ : Calibration or None
        With ``precision="int8"``: the activation ranges the int8 network is
        quantised with (a few kilobytes; a saved model carries them, so it
        scores in int8 anywhere without its training images). None otherwise.

    See Also
    --------
    skltransfer.load_image_folder : paths and labels from a class-per-folder tree.

    Examples
    --------
    >>> import numpy as np
    >>> from skltransfer import PretrainedFeatures
    >>> images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    >>> features = PretrainedFeatures("test_efficientnet", weights=None).fit_transform(images)
    >>> features.shape, features.dtype
    ((4, 256), dtype('float32'))
    """

    _parameter_constraints: dict = {
        "backbone": [str, nn.Module],
        "weights": [StrOptions({"pretrained"}), str, os.PathLike, None],
        "pooling": [StrOptions(set(POOLINGS))],
        "crop": [StrOptions(set(CROP_POLICIES))],
        "input_size": [Interval(Integral, MIN_INPUT_SIZE, None, closed="left"), tuple, list, None],
        "layers": [StrOptions({"final", "all"}), list, tuple],
        "tta": [StrOptions({"flip"}), None],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "device": [str, torch.device],
        "precision": [StrOptions({"auto", *FEATURE_PRECISIONS})],
        "engine": [StrOptions(set(ENGINES))],
        "num_workers": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
        "max_image_pixels": [Interval(Integral, 1, None, closed="left"), None],
        "verbose": ["boolean"],
        "cache": [StrOptions({"auto"}), str, os.PathLike, FeatureCache, None],
    }

    def __init__(
        self,
        backbone: str | nn.Module = "tf_efficientnet_lite0",
        *,
        weights: str | os.PathLike | None = "pretrained",
        pooling: str = "avg",
        crop: str = "auto",
        input_size: int | tuple[int, int] | None = None,
        layers: str | list[int] = "final",
        tta: str | None = None,
        batch_size: int | str = "auto",
        device: str | torch.device = "auto",
        precision: str = "auto",
        engine: str = "auto",
        num_workers: int | str = "auto",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        verbose: bool = False,
        cache: str | os.PathLike | FeatureCache | None = "auto",
    ):
        self.backbone = backbone
        self.weights = weights
        self.pooling = pooling
        self.crop = crop
        self.input_size = input_size
        self.layers = layers
        self.tta = tta
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.engine = engine
        self.num_workers = num_workers
        self.max_image_pixels = max_image_pixels
        self.verbose = verbose
        self.cache = cache

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Resolve the backbone and record its weights' fingerprint.

        No image is read (the transformer learns nothing from data), except
        with ``precision="int8"``: then up to 300 of the images, drawn with
        a fixed seed, calibrate the int8 network (unreadable ones are
        skipped; ``transform`` names them).

        Parameters
        ----------
        X : sequence of images
            Paths, encoded bytes, PIL images or uint8 arrays (checked for form only).
        y : ignored

        Returns
        -------
        self : PretrainedFeatures
        """
        _check_not_empty(as_image_items(X))
        if self.input_size is not None:
            check_input_size(self.input_size)
        device = self._device()  # fail early on an impossible device
        precision = resolve_precision(self.precision, device)
        self._engine(device, precision)  # and engine
        backbone = self._shared("cpu")
        self.backbone_digest_ = backbone.weights_digest
        self.n_features_out_ = backbone.num_features
        self.preprocessing_ = backbone.preprocessing
        self.feature_groups_ = backbone.feature_groups
        self.calibration_ = None
        if precision == "int8":
            self.calibration_ = calibrate_backbone(
                backbone, model_identity(backbone, self.pooling, self.layers, self.tta), as_image_items(X),
                max_image_pixels=self.max_image_pixels)
        return self

    def _device(self) -> torch.device:
        """The device asked for; int8 runs on the CPU, so ``"auto"`` is the CPU there."""
        if self.precision == "int8" and self.device == "auto":
            return torch.device("cpu")
        return resolve_device(self.device)

    def _shared(self, device, engine: str = "torch", precision: str = "float32",
                store: FeatureCache | None = None) -> Backbone:
        backbone = shared_backbone(
            self.backbone, self.weights, self.pooling, device, layers=self.layers, tta=self.tta,
            engine=engine, precision=precision, engine_dir=None if store is None else store.engine_directory,
            input_size=self.input_size, calibration=getattr(self, "calibration_", None),
        )
        return dataclasses.replace(backbone, preprocessing=backbone.preprocessing.with_crop(self.crop))

    def transform(self, X) -> np.ndarray:
        """One feature row per image.

        Parameters
        ----------
        X : list, tuple, ndarray or pandas Series of images
            Paths (str or PathLike), encoded bytes, PIL images, ``uint8``
            arrays ``(H, W[, 3|4])``, or one stacked ``uint8`` array
            ``(N, H, W)`` / ``(N, H, W, 3)``.

        Returns
        -------
        ndarray of shape (n_samples, n_features), float32
            One row per image; ``n_features`` is ``n_features_out_``.

        Raises
        ------
        skltransfer.ImageLoadError
            Listing every file that is missing, empty, truncated or not an image.
        WeightsMismatchError
            If the backbone's weights differ from those seen at ``fit``.
        """
        check_is_fitted(self)
        items = as_image_items(X)
        _check_not_empty(items)
        device = self._device()
        precision = resolve_precision(self.precision, device)
        engine = self._engine(device, precision)
        store = as_feature_cache(self.cache)
        backbone = self._backbone(device, engine, precision, store)
        run = dict(
            batch_size=resolve_batch_size(self.batch_size, device, backbone.preprocessing.input_size),
            device=device,
            precision=precision,
            num_workers=resolve_num_workers(self.num_workers, device),
            max_image_pixels=self.max_image_pixels,
            verbose=self.verbose,
        )
        start = time.perf_counter()

        def compute(missing, keep=None):
            # With a cache, under its lock: the other processes wait for this one, so it may use every core.
            with all_cores() if keep is not None else nullcontext():
                rows, failures = extract_features(backbone.model, backbone.preprocessing, missing, on_batch=keep,
                                                  keep_going=True, width=backbone.num_features, **run)
            if failures:  # the good rows are computed (and, with a cache, kept): hand them over too
                raise ImageLoadError(failures, rows=rows)
            return rows

        if store is None:
            features, self.cache_info_ = compute(items), CacheInfo(0, len(items), 0.0)
        else:
            config = feature_config_id(self._feature_config(backbone, precision))
            features, self.cache_info_ = cached_features(store, config, items, backbone.num_features, compute)
        self.cache_info_.seconds = time.perf_counter() - start
        return features

    def from_logits(self, rows: np.ndarray, method: str = "transform") -> np.ndarray:
        """What ``transform`` returns for rows computed already: the rows themselves.

        The hook :mod:`skltransfer.scoring` asks a model's image stage (as
        ``FineTuneClassifier.from_logits``):
        the good rows of an :class:`~skltransfer.ImageLoadError` are handed
        on to the rest of a pipeline.
        """
        if method != "transform":
            raise ValueError(f"PretrainedFeatures computes 'transform', not {method!r}")
        return rows

    def _engine(self, device: torch.device, precision: str) -> str:
        return resolve_engine(self.engine, device, precision, user_module=isinstance(self.backbone, nn.Module))

    def _feature_config(self, backbone: Backbone, precision: str) -> dict:
        """Everything that changes the numbers: the cache's configuration key.

        Not the engine in float32: OpenVINO's rows are torch's within 2e-7
        (relative), so they share entries. 16-bit rows depend on each
        engine's rounding, so there the engine is part of the key; int8
        rows depend on the calibration and on the weights' width (8 or 7
        bits, by CPU) too.
        """
        engine = {} if precision == "float32" or backbone.engine == "torch" else {"engine": backbone.engine}
        if precision == "int8":
            engine |= {"calibration": self.calibration_.digest, "int8_weights": 8 if full_range_int8() else 7}
        return engine | {
            "backbone": backbone.name,
            "weights": backbone.weights_digest,
            "preprocessing": backbone.preprocessing.as_dict(),
            "pooling": self.pooling,
            "layers": self.layers if isinstance(self.layers, str) else [int(i) for i in self.layers],
            "tta": self.tta,
            "width": backbone.num_features,
            "precision": precision,
        }

    def _backbone(self, device: torch.device, engine: str = "torch", precision: str = "float32",
                  store: FeatureCache | None = None) -> Backbone:
        backbone = self._shared(device, engine, precision, store)
        if backbone.weights_digest != self.backbone_digest_:
            raise WeightsMismatchError(
                f"The weights of backbone {backbone.name!r} (weights={self.weights!r}) "
                f"have fingerprint {backbone.weights_digest}, but this estimator was "
                f"fitted with {self.backbone_digest_}: other weights now sit behind the "
                "same name, and the features would silently drift. Refit the pipeline, "
                "or restore the original weights."
            )
        return backbone

    def __setstate__(self, state):
        # Parameters added after a model was pickled take the value that
        # reproduces what that model computed, not today's default.
        for name, value in _VALUES_BEFORE_THE_PARAMETER_EXISTED.items():
            state.setdefault(name, value)
        super().__setstate__(state)

    @property
    def _n_features_out(self) -> int:
        return self.n_features_out_

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """Output column names.

        ``pretrainedfeatures0 ...`` for the final features alone; with
        ``layers``, ``pretrainedfeatures_<map>_<i>`` where ``<map>`` is
        ``stage<k>`` or ``final``: which stage each column came from.
        """
        check_is_fitted(self)
        groups = self.feature_groups_
        if len(groups) == 1 and groups[0][0] == "final":
            return super().get_feature_names_out(input_features)
        return np.asarray(
            [f"pretrainedfeatures_{name}_{i}" for name, width in groups for i in range(width)], dtype=object
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # a table of numbers is not images
        tags.input_tags.one_d_array = True  # a list of paths, bytes, PIL images
        tags.input_tags.three_d_array = True  # stacked uint8 images (N, H, W[, C])
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = []  # always float32
        tags.requires_fit = True
        return tags


#: skltransfer 0.1.0 always ran in float32 (with torch; the engines' float32 rows agree).
_VALUES_BEFORE_THE_PARAMETER_EXISTED = {
    "precision": "float32",
    "engine": "auto",
    "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
    "input_size": None,
}


def _check_not_empty(items) -> None:
    if len(items) == 0:
        raise ValueError("Found array with 0 sample(s) (shape=(0,)) while a minimum of 1 is required.")
