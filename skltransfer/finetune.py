"""``FineTuneClassifier``: fine-tune a pretrained backbone behind fit / predict.

The estimator validates its parameters, encodes labels, splits off a
validation set, and calls the stages: :func:`~skltransfer.backbones.load_classifier`
for the model, :func:`~skltransfer.training.fine_tune` for the
protocol (probe, train, choose, refit), :func:`~skltransfer.inference.extract_features` for predictions.
"""

from __future__ import annotations

import os
import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d

from .backbones import build_classifier_architecture, load_classifier
from .cache import FeatureCache, as_feature_cache
from .decoding import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, as_image_items
from .engines import ENGINES, resolve_engine
from .features import PretrainedFeatures
from .inference import extract_features
from .preprocessing import CROP_POLICIES, MIN_INPUT_SIZE, auto_input_size, check_input_size
from .registry import forget_inference_copies, inference_copy
from .runtime import PRECISIONS, resolve_batch_size, resolve_device
from .training import AUGMENT_PRESETS, TrainingPlan, fine_tune, training_augmentation
from .weights import weights_digest

__all__ = ["FineTuneClassifier"]


class FineTuneClassifier(ClassifierMixin, BaseEstimator):
    """Fine-tune a pretrained image backbone end to end, as a scikit-learn classifier.

    By default the classifier starts where the frozen pipeline ends and keeps
    whichever of the two does better on held-out images (LP-FT, Kumar et al.
    2022): a linear probe (``LogisticRegression(max_iter=1000)``, the README's
    head) is fitted on the backbone's frozen features, computed through
    :class:`~skltransfer.PretrainedFeatures` and its cache (free when that pipeline ran
    on these images before); the probe becomes the network's head ("epoch 0");
    the whole network then trains at a small learning rate with every
    BatchNorm in inference mode; each epoch is scored on a stratified
    validation split, and the last state must beat the probe clearly. The
    winner is then refitted on all the images: when the probe wins, the
    result is exactly the frozen pipeline; when fine-tuning wins, it runs
    again on every image and the model keeps the mean of the two runs'
    weights. ``best_epoch_`` says which one you got, ``history_`` how.

    Parameters
    ----------
    backbone : str, default="tf_efficientnet_lite0"
        A timm model name or ``"torchvision:<name>"`` (as for
        :class:`~skltransfer.PretrainedFeatures`).
    weights : "pretrained", None or path, default="pretrained"
        Where the backbone's starting weights come from.
    init_head : {"probe", "random"}, default="probe"
        ``"probe"``: the head starts as a linear probe on frozen features
        (fitted on the training part of the split), and the probe is a
        candidate for the final model. ``"random"``: a randomly initialised
        head (then ``head_epochs`` or a higher ``learning_rate`` for the
        head is the usual recipe). A backbone whose pooled features are not
        its classifier's input (VGG's dense layers) gets a random head after
        a warning.
    unfreeze : int, "all" or list of str, default="all"
        What learns besides the head. ``0``: nothing (a linear probe
        with augmentation). ``N``: the last N layer groups. For timm models a
        group is what ``model.group_matcher(coarse=True)`` groups: the stem,
        then one group per stage (EfficientNet: the 7 block stages, the head
        convolution going with the last; ResNet: layer1..layer4; ViT: each
        transformer block). For torchvision models, each top-level child
        (``features``, ``layer4``...). ``"all"``: everything. A list of
        ``fnmatch`` patterns on parameter names (``["blocks.6.*", "conv_head.*"]``).
    epochs : int, default=8
        Most epochs with ``unfreeze`` applied (early stopping may end sooner).
    head_epochs : int, default=0
        Epochs before those, training only the head (fastai's ``fine_tune``).
    learning_rate : float, default=2e-4
        Peak learning rate of the head.
    backbone_lr_ratio : float, default=1.0
        Pretrained layers learn at ``learning_rate * backbone_lr_ratio``
        (LP-FT trains head and backbone alike; with a random head, 0.1 is usual).
    layer_decay : float or None, default=None
        Layer-wise decay: each group further from the head learns ``layer_decay``
        times slower than the next.
    weight_decay : float, default=0.01
        AdamW weight decay (not on biases and norm weights).
    schedule : {"cosine", "onecycle", "constant"}, default="cosine"
        Learning-rate schedule of each phase, after ``warmup_epochs`` of linear warm-up.
    warmup_epochs : float, default=1.0
    label_smoothing : float, default=0.0
        Cross-entropy label smoothing of the training loss (validation is
        scored with plain cross-entropy). Plain cross-entropy (0) fine-tunes
        further; 0.1, the earlier default, holds the logits back a little
        (the user guide's "Label smoothing" section has the figures).
    max_grad_norm : float or None, default=1.0
        Gradient clipping (None: off).
    ema_epochs : float or None, default=1.0
        Average the weights along training: validation scores, and the
        model keeps, an exponential moving average of the trained weights
        over about this many epochs (timm's ``ModelEmaV3``, with its
        warm-up); a refit ends with the same average. It smooths the
        epoch-to-epoch swing of fine-tuning on few images. None: the
        weights as the last step left them.
    augment : {"auto", "flip", "noflip", "none"}, bool or callable, default="auto"
        Training geometry (:func:`skltransfer.training.training_augmentation`).
        ``"flip"``: random resized crop (35-100 % of the area) + horizontal
        flip, for photos. ``"noflip"``: never mirrored, for data whose
        meaning has a side (digits, signs, text). ``"auto"``: per image,
        ``"flip"`` for images larger than the model's input, and a gentler
        crop (80-100 %) without mirroring for smaller ones (icons, digits,
        thumbnails). ``"none"`` / False: the eval geometry. True: ``"flip"``.
        A callable maps a ``(3, H, W)`` uint8 tensor to one of the input size.
    crop : {"auto", "center", "none", "pad"}, default="auto"
        The eval geometry (validation and prediction), as for
        :class:`~skltransfer.PretrainedFeatures`: ``"auto"`` resizes images
        smaller than the input without cropping and centre-crops the rest.
    input_size : "auto", None, int or (height, width), default=None
        The size the network trains and predicts at. ``None``: the size its
        weights were trained at (224 for EfficientNet-Lite0). Smaller is
        proportionally faster, in training and in prediction (128 is about a
        third of the compute of 224); images much smaller than the input are
        scaled up anyway, so they may lose little. ``"auto"``: 160 px
        (:func:`~skltransfer.preprocessing.auto_input_size`) where the median
        training image is at most 64 px on its longer side (digits, icons,
        CIFAR-like thumbnails), the weights' size otherwise. The probe and
        the validation split see the same size, so a size that costs
        accuracy shows in ``history_``; the size used is
        ``preprocessing_.input_size``. At least 32.
    tta : None, "flip" or "auto", default=None
        ``"flip"``: predictions average the logits of each image and its
        mirror. ``"auto"``: the same, only if it scores better on the
        validation split (accuracy, then log-loss) with the state the fit
        kept: mirrors help for photos and hurt for digits or text. A split
        of a few hundred images or fewer cannot see a gain or loss of a
        point reliably, so on the shared sets this was no better than
        ``None`` overall (the guide has the runs). Without a split,
        ``"auto"`` does not mirror. What was chosen is ``tta_``.
    freeze_batchnorm : bool, default=True
        Keep every BatchNorm's running statistics (inference mode) while
        training; its scale and shift still learn. False: BatchNorms in
        learning groups re-estimate their statistics from the training
        batches (frozen groups never do).
    class_weight : "balanced", dict or None, default=None
        Weights of the classes in the loss (and in the probe).
    early_stopping : "auto" or bool, default="auto"
        Hold out ``validation_fraction`` of the training images (stratified),
        score every epoch (and the probe) on them, and set the fine-tuned
        state against the probe: the last state with ``refit_epochs="all"``
        (the default), else the best, stopping after ``n_iter_no_change``
        epochs without a better one.
        ``"auto"``: do so when the split leaves at least 20 validation
        images and 2 per class; with fewer, all images train, every epoch
        runs and the last state is kept (the probe still starts it). True:
        always split (an error if the data cannot be split). False: never.
    validation_fraction : float, default=0.2
    n_iter_no_change : int, default=3
        Used with ``refit_epochs="kept"`` only.
    refit : "average" or bool, default="average"
        After the validation split chose fine-tuning, train it again on every
        image, from the pretrained weights and an all-image probe, for
        ``refit_epochs`` (this roughly doubles the fit's time), then keep
        the mean of the two runs' weights: the state the split validated
        and the refit's (a two-model soup: one fine-tuning run on a thousand
        images ends a point or two away from another, and two runs of one
        pretrained network average into one model that is at least as good;
        the user guide's "Refit" section has the figures). True keeps the
        refit alone, as ``GridSearchCV(refit=True)`` keeps the refitted
        setting; False keeps the state trained on the other
        ``1 - validation_fraction`` of the images. The probe, when it wins,
        is refitted on every image either way (free): the result is then
        the frozen pipeline.
    refit_epochs : {"all", "kept"}, default="all"
        How long a fine-tuned winner trains again on every image.
        ``"kept"``: as many epochs as the state the validation split kept
        (the first epochs of the same schedule), with early stopping.
        ``"all"``: the whole schedule (``head_epochs + epochs``), as a fit
        without a split would; the split then decides only whether
        fine-tuning beats the probe, not for how long to train, which a
        small split decides noisily (on 200 images the best epoch moves by
        several between seeds). So the split validates what the refit
        repeats: its run trains the whole schedule too (no early stopping),
        and its last state, not its best epoch, must beat the probe clearly.
    batch_size : int or "auto", default="auto"
        Images per training step (32 on CPU, 64 on CUDA); prediction uses
        :class:`~skltransfer.PretrainedFeatures`' choice (6 at 224 x 224 on CPU).
    device : str, default="auto"
    precision : {"auto", "float32", "bfloat16", "float16"}, default="auto"
        Training precision (autocast; the weights stay float32). ``"auto"``:
        bfloat16 on CUDA GPUs that support it, float16 with loss scaling on
        other GPUs (the bfloat16 path tested on an NVIDIA H200; its speed
        not benchmarked), float32 on the CPU. ``"bfloat16"``
        on the CPU needs native bfloat16 (AVX-512 BF16 or AMX): measured on
        a Xeon with AMX it trains EfficientNet-Lite0 no faster than float32
        (21 vs 20-25 images/s a step of 32; its depthwise convolutions and
        their gradients gain nothing), which is why it is not the CPU's
        default. Validation, the probe's features and predictions are float32.
    num_workers : int, default=0
        Decoding processes.
    max_image_pixels : int or None, default=178_956_970
        Images with more pixels are refused from their headers, before
        decoding (as for :class:`~skltransfer.PretrainedFeatures`).
    engine : {"auto", "torch", "openvino"}, default="auto"
        What runs predictions and the probe's features (training is
        torch's): as for :class:`~skltransfer.PretrainedFeatures`,
        ``"auto"`` is OpenVINO on the CPU (the fine-tuned model converted on
        the first prediction, the conversion kept in the feature cache's
        folder for the next process), torch on CUDA.
    cache : "auto", path, URL, FeatureCache or None, default="auto"
        The feature cache (as for :class:`~skltransfer.PretrainedFeatures`)
        that holds the probe's frozen features, so a second fit on the same
        images computes none, and the engine's conversion of the fine-tuned
        model. ``None``: neither is kept.
    warm_start : bool, default=False
        Continue training the fitted model on a new ``fit`` instead of
        starting over (no probe then).
    random_state : int, RandomState or None, default=None
        Seeds the head's initialisation, the shuffling, the augmentation and the
        validation split: CPU runs with the same seed give the same model.
    verbose : bool, default=False
        A progress bar per epoch with the running loss and accuracy.

    Attributes
    ----------
    classes_ : ndarray
        Class labels, in the order of ``predict_proba``'s columns.
    model_ : torch.nn.Module
        The fine-tuned network (eval mode). Predictions run a copy of it with
        BatchNorm folded into the convolutions, made on the first prediction
        after ``fit`` (:func:`skltransfer.registry.inference_copy`): after
        changing ``model_``'s weights by hand, call
        :func:`skltransfer.registry.forget_inference_copies` on it.
    preprocessing_ : Preprocessing
        Eval resize, crop and normalisation.
    history_ : list of dict
        One entry per epoch: ``epoch``, ``phase`` ("probe" for epoch 0,
        "head" or "tune"), ``train_loss``, ``train_accuracy``,
        ``learning_rate`` (the head's, at the epoch's end),
        ``images_per_second``; with a validation split also ``valid_loss``
        (cross-entropy) and ``valid_accuracy``, and ``best`` on the kept state
        (with ``refitted`` when ``refit`` trained it again on every image;
        that run's epochs follow, ``phase="refit"``, without validation scores).
        Exactly one entry has ``final=True``: the state the model holds, with
        ``validated``, whether held-out images scored that very state (False
        after a refit and without a validation split); with
        ``refit="average"`` it is the refit's last row, with
        ``mean_with_kept``: the model holds the mean of that state and the
        kept one.
    best_epoch_ : int
        The epoch whose state was kept: 0 is the probe (the frozen pipeline,
        refitted on all images), ``None`` when no validation split chose.
    tta_ : None or "flip"
        The test-time augmentation predictions use: ``tta`` itself, or what
        ``tta="auto"`` chose (the kept row of ``history_`` then holds
        ``valid_accuracy_flip``, ``valid_loss_flip`` and ``tta``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    >>> y = np.array(["a", "b"] * 4)
    >>> clf = FineTuneClassifier("test_efficientnet", weights=None, epochs=1, random_state=0)
    >>> clf.fit(X, y).best_epoch_ is None  # 8 images: too few to hold any out
    True
    >>> clf.predict_proba(X).shape
    (8, 2)
    """

    _parameter_constraints: dict = {
        "backbone": [str],
        "weights": [StrOptions({"pretrained"}), str, os.PathLike, None],
        "init_head": [StrOptions({"probe", "random"})],
        "unfreeze": [Interval(Integral, 0, None, closed="left"), StrOptions({"all"}), list, tuple],
        "epochs": [Interval(Integral, 0, None, closed="left")],
        "head_epochs": [Interval(Integral, 0, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "backbone_lr_ratio": [Interval(Real, 0, None, closed="left")],
        "layer_decay": [Interval(Real, 0, 1, closed="right"), None],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "schedule": [StrOptions({"cosine", "onecycle", "constant"})],
        "warmup_epochs": [Interval(Real, 0, None, closed="left")],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "max_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "ema_epochs": [Interval(Real, 0, None, closed="neither"), None],
        "augment": ["boolean", StrOptions(set(AUGMENT_PRESETS)), callable],
        "crop": [StrOptions(set(CROP_POLICIES))],
        "input_size": [Interval(Integral, MIN_INPUT_SIZE, None, closed="left"), tuple, list,
                       StrOptions({"auto"}), None],
        "tta": [StrOptions({"flip", "auto"}), None],
        "freeze_batchnorm": ["boolean"],
        "class_weight": [StrOptions({"balanced"}), dict, None],
        "early_stopping": ["boolean", StrOptions({"auto"})],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "refit": ["boolean", StrOptions({"average"})],
        "refit_epochs": [StrOptions({"kept", "all"})],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "device": [str, torch.device],
        "precision": [StrOptions({"auto", *PRECISIONS})],
        "num_workers": [Interval(Integral, 0, None, closed="left")],
        "max_image_pixels": [Interval(Integral, 1, None, closed="left"), None],
        "engine": [StrOptions(set(ENGINES))],
        "cache": [StrOptions({"auto"}), str, os.PathLike, FeatureCache, None],
        "warm_start": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["boolean"],
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        *,
        weights: str | os.PathLike | None = "pretrained",
        init_head: str = "probe",
        unfreeze: int | str | list[str] = "all",
        epochs: int = 8,
        head_epochs: int = 0,
        learning_rate: float = 2e-4,
        backbone_lr_ratio: float = 1.0,
        layer_decay: float | None = None,
        weight_decay: float = 0.01,
        schedule: str = "cosine",
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.0,
        max_grad_norm: float | None = 1.0,
        ema_epochs: float | None = 1.0,
        augment: bool | str | Any = "auto",
        crop: str = "auto",
        input_size: int | tuple[int, int] | str | None = None,
        tta: str | None = None,
        freeze_batchnorm: bool = True,
        class_weight: str | dict | None = None,
        early_stopping: bool | str = "auto",
        validation_fraction: float = 0.2,
        n_iter_no_change: int = 3,
        refit: bool | str = "average",
        refit_epochs: str = "all",
        batch_size: int | str = "auto",
        device: str | torch.device = "auto",
        precision: str = "auto",
        num_workers: int = 0,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        engine: str = "auto",
        cache: str | os.PathLike | FeatureCache | None = "auto",
        warm_start: bool = False,
        random_state: Any = None,
        verbose: bool = False,
    ):
        self.backbone = backbone
        self.weights = weights
        self.init_head = init_head
        self.unfreeze = unfreeze
        self.epochs = epochs
        self.head_epochs = head_epochs
        self.learning_rate = learning_rate
        self.backbone_lr_ratio = backbone_lr_ratio
        self.layer_decay = layer_decay
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.warmup_epochs = warmup_epochs
        self.label_smoothing = label_smoothing
        self.max_grad_norm = max_grad_norm
        self.ema_epochs = ema_epochs
        self.augment = augment
        self.crop = crop
        self.input_size = input_size
        self.tta = tta
        self.freeze_batchnorm = freeze_batchnorm
        self.class_weight = class_weight
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.refit = refit
        self.refit_epochs = refit_epochs
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self.max_image_pixels = max_image_pixels
        self.engine = engine
        self.cache = cache
        self.warm_start = warm_start
        self.random_state = random_state
        self.verbose = verbose

    # -- fitting ----------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Fine-tune on images ``X`` with labels ``y``.

        Raises
        ------
        ValueError
            Fewer than two classes, ``X`` and ``y`` of different lengths, an
            ``unfreeze`` pattern that matches no parameter.
        skltransfer.ImageLoadError
            Naming every image that cannot be read.
        """
        items = as_image_items(X)
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None.")
        y = column_or_1d(y, warn=True)  # a column vector is one label per image, with scikit-learn's warning
        if len(items) != len(y):
            raise ValueError(f"X and y have different lengths: {len(items)} images, {len(y)} labels")
        check_classification_targets(y)
        classes, targets = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"need at least two classes to train a classifier, got 1 class: {classes.tolist()}")
        continuing = self.warm_start and hasattr(self, "model_")
        if continuing and not np.array_equal(classes, self.classes_):
            raise ValueError(f"warm_start: the classes changed from {self.classes_.tolist()} to {classes.tolist()}")
        if self.input_size is not None and not isinstance(self.input_size, str):
            check_input_size(self.input_size)
        device = resolve_device(self.device)
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        weights = None if self.class_weight is None else torch.tensor(
            compute_class_weight(self.class_weight, classes=classes, y=y), dtype=torch.float32)
        split = self._validation_split(targets, seed)
        plan = TrainingPlan.from_estimator(self, device, seed=seed, class_weights=weights, validated=split is not None)
        if continuing:
            model, preprocessing, classifier = self.model_, self.preprocessing_, self.classifier_
            model.requires_grad_(True)
        else:
            model, preprocessing, classifier = load_classifier(self.backbone, self.weights, len(classes), seed=seed)
            input_size = self.input_size
            if input_size == "auto":
                input_size = auto_input_size(items, preprocessing.input_size, max_pixels=self.max_image_pixels)
            preprocessing = preprocessing.with_crop(self.crop).with_input_size(input_size)
        features = None
        if self.init_head == "probe" and not continuing:
            features = self._frozen_features(items, model, classifier, input_size)
        outcome = fine_tune(model, classifier, self.unfreeze, items, targets, preprocessing,
                            self._augmentation(preprocessing), plan, device, split=split, features=features,
                            class_weight=self.class_weight, refit=self.refit,
                            refit_epochs=self.refit_epochs, tta=self.tta,
                            history=self.history_ if continuing else ())
        self.model_ = model.to("cpu") if device.type != "cpu" else model
        forget_inference_copies(self.model_)  # warm_start trained the same module further
        self.preprocessing_ = preprocessing
        self.classifier_ = classifier
        self.classes_ = classes
        self.history_ = outcome.history
        self.best_epoch_ = None if outcome.best is None else int(outcome.best["epoch"])
        self.tta_ = outcome.tta
        self.n_trainable_parameters_ = sum(p.numel() for p in model.parameters())
        return self

    def _validation_split(self, targets: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Stratified (train, validation) positions, or None when no validation set is held out."""
        if self.early_stopping is False:
            return None
        n_valid = int(np.ceil(self.validation_fraction * len(targets)))
        n_classes = int(targets.max()) + 1
        enough = n_valid >= max(20, 2 * n_classes) and np.bincount(targets).min() >= 2 and (
            len(targets) - n_valid >= n_classes)
        if self.early_stopping == "auto" and not enough:
            return None
        indices = np.arange(len(targets))
        train_idx, valid_idx = train_test_split(indices, test_size=self.validation_fraction,
                                                stratify=targets, random_state=seed)
        return np.sort(train_idx), np.sort(valid_idx)

    def _frozen_features(self, items, model: torch.nn.Module, classifier: str,
                         input_size: tuple[int, int] | int | None) -> np.ndarray | None:
        """The backbone's frozen features of every item at ``input_size``, through PretrainedFeatures and its cache.

        None (after a warning) when they are not what the classifier reads.
        """
        extractor = PretrainedFeatures(
            self.backbone, weights=self.weights, crop=self.crop, device=self.device, engine=self.engine,
            num_workers=self.num_workers, max_image_pixels=self.max_image_pixels, precision="float32",
            cache=self.cache, input_size=input_size,
        )
        width = model.get_submodule(classifier).in_features
        features = extractor.fit_transform(items)
        if features.shape[1] != width:
            warnings.warn(
                f"{self.backbone!r}: its pooled features ({features.shape[1]} wide) are not its classifier's "
                f"input ({width} wide), so the head cannot start as a linear probe; it starts at random",
                UserWarning, stacklevel=3,
            )
            return None
        return features

    def _augmentation(self, preprocessing):
        augment = self.augment
        if augment is True:
            augment = "flip"
        elif augment is False:
            augment = "none"
        return training_augmentation(preprocessing, augment) if isinstance(augment, str) else augment

    # -- predicting -------------------------------------------------------------------

    def decision_function(self, X) -> np.ndarray:
        """Logits, ``(n_samples, n_classes)`` (``(n_samples,)`` for two classes, as scikit-learn does)."""
        return self.from_logits(self._logits(X), "decision_function")

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (softmax of the logits), columns in ``classes_`` order."""
        return self.from_logits(self._logits(X), "predict_proba")

    def predict(self, X) -> np.ndarray:
        """The most probable class of each image."""
        return self.from_logits(self._logits(X), "predict")

    def from_logits(self, logits: np.ndarray, method: str) -> np.ndarray:
        """What ``method`` (``"predict"``, ``"predict_proba"``, ``"decision_function"``) returns for these logits.

        For logits computed already: the ``rows`` of an
        :class:`~skltransfer.ImageLoadError` from this classifier, say.
        """
        check_is_fitted(self)
        if method == "predict":
            return self.classes_[logits.argmax(axis=1)]
        if method == "predict_proba":
            return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
        if method == "decision_function":
            return logits[:, 1] - logits[:, 0] if len(self.classes_) == 2 else logits
        raise ValueError(f"method must be 'predict', 'predict_proba' or 'decision_function', got {method!r}")

    def _logits(self, X) -> np.ndarray:
        check_is_fitted(self)
        items = as_image_items(X)
        device = resolve_device(self.device)
        engine = resolve_engine(self.engine, device)
        # A copy with BatchNorm folded into the convolutions (compiled by the
        # engine), made once per fitted model, device and engine.
        store = as_feature_cache(self.cache)
        model = inference_copy(self.model_, device, engine=engine, preprocessing=self.preprocessing_,
                               engine_dir=None if store is None else store.engine_directory, tta=self.tta_)
        batch_size = resolve_batch_size(self.batch_size, device, self.preprocessing_.input_size)
        logits, failures = extract_features(model, self.preprocessing_, items, batch_size=batch_size, device=device,
                                            num_workers=self.num_workers, max_image_pixels=self.max_image_pixels,
                                            keep_going=True, width=len(self.classes_))
        if failures:  # the good images' logits are computed: hand them over (from_logits uses them)
            raise ImageLoadError(failures, rows=logits)
        return logits

    # -- persistence: weights as plain arrays, the module rebuilt from its name on load ---
    # (arrays, not tensors: skltransfer.save stores them without pickle)

    def __getstate__(self):
        state = super().__getstate__()
        if "model_" in state:
            state = dict(state)
            model = state.pop("model_")
            state["_model_state"] = {k: v.detach().to("cpu").contiguous().numpy().copy()
                                     for k, v in model.state_dict().items()}
            state["_model_digest"] = weights_digest(model)
        return state

    def __setstate__(self, state):
        model_state = state.pop("_model_state", None)
        digest = state.pop("_model_digest", None)
        state.setdefault("engine", "auto")  # pickled before these parameters existed
        state.setdefault("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
        state.setdefault("cache", "auto")
        state.setdefault("input_size", None)
        state.setdefault("ema_epochs", None)
        for name, before in (("init_head", "random"), ("crop", "center"), ("tta", None),  # what they did then
                             ("freeze_batchnorm", False), ("precision", "auto"), ("refit_epochs", "kept")):
            state.setdefault(name, before)
        if "classes_" in state:
            state.setdefault("tta_", state["tta"])  # fitted before "auto": the parameter was the mode
        super().__setstate__(state)
        if model_state is not None:
            model, _, _ = build_classifier_architecture(self.backbone, len(self.classes_))
            # Tensors in files written before the arrays.
            model.load_state_dict({k: torch.as_tensor(v) for k, v in model_state.items()})
            model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
            if digest is not None and weights_digest(model) != digest:
                raise ValueError("the fine-tuned weights did not survive unpickling intact")
            self.model_ = model

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.one_d_array = True
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.non_deterministic = True  # exact repeatability holds on CPU with random_state
        return tags
