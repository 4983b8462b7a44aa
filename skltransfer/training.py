"""Training a classifier end to end: which parameters learn, at what rate, for how long.

One job: given a classifier module, labelled image items and a plan, run
the optimisation. Decoding comes from :mod:`skltransfer.decoding`,
geometry and normalisation from :mod:`skltransfer.preprocessing`; the
estimator (:mod:`skltransfer.finetune`) validates parameters and calls this.

Layer groups come from timm's ``group_matcher`` (coarse: the stem, one group
per stage, the head convolution with the last stage); torchvision models use
their top-level children. The classifier is always trained.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .decoding import DEFAULT_MAX_IMAGE_PIXELS, ImageFailure, ImageLoadError, describe_item
from .inference import extract_features, image_batches
from .pooling import FlipAveraged
from .preprocessing import Preprocessing
from .runtime import tune_allocator

__all__ = [
    "AUGMENT_PRESETS", "FineTuning", "TrainingPlan", "average_weights", "choose_tta", "fine_tune", "layer_groups",
    "linear_probe", "select_trainable", "set_linear_head", "train_classifier", "training_augmentation",
]


# -- which parameters learn ------------------------------------------------------


def layer_groups(model: nn.Module, classifier: str) -> list[list[str]]:
    """Backbone parameter names in groups, input side first; the classifier excluded.

    timm models: ``group_parameters(model, model.group_matcher(coarse=True))``.
    Other models: one group per top-level child that holds parameters.
    """
    def is_head(name: str) -> bool:
        return name == classifier or name.startswith(classifier + ".")

    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        grouped = group_parameters(model, model.group_matcher(coarse=True))
        groups = [[n for n in names if not is_head(n)] for _, names in sorted(grouped.items())]
    else:
        groups = []
        for child_name, child in model.named_children():
            names = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
            groups.append([n for n in names if not is_head(n)])
    return [g for g in groups if g]


def select_trainable(
    model: nn.Module, classifier: str, unfreeze: int | str | Sequence[str]
) -> list[list[str]]:
    """The backbone groups that learn (input side first), per ``unfreeze``.

    ``0``: none (only the classifier); ``N``: the last N groups; ``"all"``:
    every group; a list of patterns (``fnmatch`` on parameter names): the
    matching parameters, as one group. A pattern that matches nothing is an
    error.
    """
    groups = layer_groups(model, classifier)
    if unfreeze == "all":
        return groups
    if isinstance(unfreeze, (int, np.integer)) and not isinstance(unfreeze, bool):
        if unfreeze < 0:
            raise ValueError(f"unfreeze must be >= 0, got {unfreeze}")
        return groups[len(groups) - min(int(unfreeze), len(groups)) :] if unfreeze else []
    patterns = list(unfreeze)
    names = [n for n, _ in model.named_parameters()]
    chosen = []
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            close = sorted({n.rsplit(".", 2)[0] + ".*" for n in names})[:8]
            raise ValueError(
                f"unfreeze pattern {pattern!r} matches no parameter of this model; "
                f"parameter names look like: {', '.join(close)}"
            )
        chosen += [h for h in hits if h not in chosen]
    return [chosen]


# -- data -----------------------------------------------------------------------------


AUGMENT_PRESETS = ("auto", "flip", "noflip", "none")


def training_augmentation(preprocessing: Preprocessing, preset: str = "flip", scale=(0.35, 1.0)) -> Callable:
    """Training geometry on uint8 tensors, by preset.

    ``"flip"``: random resized crop (``scale`` of the area, 0.35-1: the lower
    bound fastai uses for fine-tuning on small data sets; timm's
    ImageNet-from-scratch 0.08 is harsher) + horizontal flip, for photos.
    ``"noflip"``: the same crop, never mirrored (digits, signs, text: a
    mirror image means something else). ``"auto"``: per image, as
    ``crop="auto"`` decides per image: images larger than the input on
    either side get ``"flip"``; smaller ones a gentler crop (0.8-1: a small
    image has few pixels to lose; on the demo's 8 px digits 0.6-1 cost 2
    points of validation accuracy after 4 epochs where no augmentation
    gained 2) and no mirroring (small images are often symbols). ``"none"``: the eval geometry.

    Examples
    --------
    >>> from skltransfer.preprocessing import Preprocessing
    >>> p = Preprocessing((32, 32), 1.0, "center", "bilinear", (0.5,) * 3, (0.5,) * 3)
    >>> training_augmentation(p, "auto")(torch.zeros(3, 20, 24, dtype=torch.uint8)).shape
    torch.Size([3, 32, 32])
    """
    if preset == "none":
        return preprocessing.resize_crop
    if preset == "auto":
        return _PerImageSize(preprocessing, training_augmentation(preprocessing, "flip", scale),
                             training_augmentation(preprocessing, "noflip", (0.8, 1.0)))
    if preset not in ("flip", "noflip"):
        raise ValueError(f"augment must be one of {AUGMENT_PRESETS}, True, False or a callable, got {preset!r}")
    from torchvision.transforms import v2

    from .preprocessing import interpolation_mode

    crop = v2.RandomResizedCrop(list(preprocessing.input_size), scale=scale,
                                interpolation=interpolation_mode(preprocessing.interpolation), antialias=True)
    return v2.Compose([crop, v2.RandomHorizontalFlip()]) if preset == "flip" else crop


class _PerImageSize:
    """``large`` for images larger than the input on either side, ``small`` for the rest."""

    def __init__(self, preprocessing: Preprocessing, large: Callable, small: Callable):
        self.input_size, self.large, self.small = preprocessing.input_size, large, small

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        small = height < self.input_size[0] and width < self.input_size[1]
        return (self.small if small else self.large)(image)


# -- the head from a linear probe ------------------------------------------------------


def linear_probe(features: np.ndarray, targets: np.ndarray, n_classes: int, *, class_weight=None,
                 max_iter: int = 1000):
    """The README's frozen pipeline head: ``LogisticRegression(max_iter=1000)`` on frozen features.

    Returns the fitted estimator; :func:`set_linear_head` copies it into a
    classifier. LP-FT (Kumar et al. 2022) starts fine-tuning from this head,
    so that a random head sends no large gradients into the pretrained features.
    """
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=max_iter, class_weight=class_weight)
    probe.fit(features, targets)
    if len(probe.classes_) != n_classes:
        raise ValueError(f"the linear probe saw {len(probe.classes_)} of {n_classes} classes")
    return probe


@torch.no_grad()
def set_linear_head(model: nn.Module, classifier: str, probe) -> None:
    """Copy a fitted linear model (``coef_``, ``intercept_``) into the classifier ``nn.Linear``.

    A binary probe's single row ``w`` becomes ``(-w/2, w/2)``: the same
    softmax probabilities as its sigmoid.
    """
    head = model.get_submodule(classifier)
    coef = torch.as_tensor(probe.coef_, dtype=torch.float32)
    bias = torch.as_tensor(probe.intercept_, dtype=torch.float32)
    if coef.shape[0] == 1 and head.out_features == 2:
        coef, bias = torch.cat([-coef / 2, coef / 2]), torch.cat([-bias / 2, bias / 2])
    if tuple(coef.shape) != tuple(head.weight.shape):
        raise ValueError(f"probe of shape {tuple(coef.shape)} does not fit the head {tuple(head.weight.shape)}")
    head.weight.copy_(coef)
    head.bias.copy_(bias)


# -- the plan and the loop ------------------------------------------------------------


@dataclass(frozen=True)
class TrainingPlan:
    """Everything the loop needs besides the model and the data: an input, never changed by the loop.

    Built from an estimator's parameters (:meth:`from_estimator`), so its
    defaults are the estimator's; ``stop_after`` is set for a refit.
    """

    epochs: int
    head_epochs: int
    learning_rate: float
    backbone_lr_ratio: float
    layer_decay: float | None
    weight_decay: float
    schedule: str
    warmup_epochs: float
    label_smoothing: float
    max_grad_norm: float | None
    batch_size: int
    num_workers: int
    max_image_pixels: int | None
    n_iter_no_change: int | None
    freeze_batchnorm: bool
    ema_epochs: float | None
    autocast_dtype: torch.dtype | None
    class_weights: torch.Tensor | None
    verbose: bool
    seed: int
    stop_after: int | None = None
    keep: str = "best"

    @classmethod
    def from_estimator(cls, estimator: Any, device: torch.device, *, seed: int = 0,
                       class_weights: torch.Tensor | None = None, validated: bool = True) -> TrainingPlan:
        """The plan of a :class:`~skltransfer.FineTuneClassifier`'s parameters on ``device``.

        ``validated``: whether a validation split is held out (early stopping
        needs one). ``refit_epochs="all"`` validates the whole schedule: no
        early stopping, and the last trained state is the one set against
        the probe (``keep="last"``), since that is what the refit repeats.

        Examples
        --------
        >>> from skltransfer import FineTuneClassifier
        >>> TrainingPlan.from_estimator(FineTuneClassifier(epochs=3), torch.device("cpu")).batch_size
        32
        """
        from .runtime import train_batch_size, training_autocast_dtype

        e = estimator
        return cls(
            epochs=e.epochs, head_epochs=e.head_epochs, learning_rate=e.learning_rate,
            backbone_lr_ratio=e.backbone_lr_ratio, layer_decay=e.layer_decay, weight_decay=e.weight_decay,
            schedule=e.schedule, warmup_epochs=e.warmup_epochs, label_smoothing=e.label_smoothing,
            max_grad_norm=e.max_grad_norm, batch_size=train_batch_size(e.batch_size, device),
            num_workers=e.num_workers, max_image_pixels=e.max_image_pixels,
            n_iter_no_change=e.n_iter_no_change if validated and e.refit_epochs != "all" else None,
            keep="last" if e.refit_epochs == "all" else "best", freeze_batchnorm=e.freeze_batchnorm,
            ema_epochs=e.ema_epochs,
            autocast_dtype=training_autocast_dtype(e.precision, device), class_weights=class_weights,
            verbose=e.verbose, seed=seed,
        )


@dataclass
class FineTuning:
    """What :func:`fine_tune` did: the history (``history_``), the row of the state kept (or None), the
    test-time augmentation predictions use (``tta_``)."""

    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    tta: str | None = None


def fine_tune(model: nn.Module, classifier: str, unfreeze: Any, items: Sequence[Any], targets: np.ndarray,
              preprocessing: Preprocessing, augment: Callable | None, plan: TrainingPlan, device: torch.device, *,
              split: tuple[np.ndarray, np.ndarray] | None = None, features: np.ndarray | None = None,
              class_weight: Any = None, refit: bool | str = True, refit_epochs: str = "all",
              tta: str | None = None, history: Sequence[dict[str, Any]] = ()) -> FineTuning:
    """The fine-tuning protocol, in one place: probe, train, choose, refit.

    1. **Probe** (with ``features``, the frozen features of every item): a
       linear probe on the training part becomes the head, and "epoch 0".
    2. **Train** on the training part (``split[0]``; every item without a
       split), scoring each epoch on ``split[1]`` (:func:`train_classifier`).
    3. **Choose**: the best trained state, unless the probe is as good
       (``_choose``); the kept row is marked ``best``. With ``tta="auto"``,
       the kept state is also scored on the validation split with each image
       averaged with its mirror (``valid_accuracy_flip``, ``valid_loss_flip``
       on the kept row), and predictions mirror too only if that scores
       better (:func:`choose_tta`).
    4. **Refit** (``refit`` with a split): on every item, what won: the
       probe refitted, or the same training again from the same starting
       weights and seed, for as many epochs as the kept state had
       (``refit_epochs="kept"``) or the whole schedule (``"all"``). Its epochs
       join the history as ``phase="refit"`` and the kept row gets
       ``refitted``. With ``refit="average"`` the model ends as the mean of
       the kept state's weights and the refit's (:func:`average_weights`),
       and the refit's last row gets ``mean_with_kept``.

    The row whose state the model ends with is marked ``final``, with
    ``validated``: whether the validation split scored that very state.

    ``model`` is changed in place; ``history`` holds the rows of earlier
    fits (``warm_start``), whose epochs are counted on.
    """
    n_classes = model.get_submodule(classifier).out_features
    train_idx = split[0] if split is not None else np.arange(len(items))
    validation = None if split is None else ([items[i] for i in split[1]], targets[split[1]])
    train_items, train_targets = [items[i] for i in train_idx], targets[train_idx]
    start = None
    if features is not None:
        probe = linear_probe(features[train_idx], train_targets, n_classes, class_weight=class_weight)
        start = {"epoch": 0, "phase": "probe", "train_loss": float("nan"),
                 "train_accuracy": float(probe.score(features[train_idx], train_targets)),
                 "learning_rate": 0.0, "images_per_second": float("nan")}
    # What a refit on every image starts from: the weights before the probe and training.
    initial = copy.deepcopy(model.state_dict()) if split is not None and refit else None
    trained_before = sum(1 for row in history if row["phase"] in ("head", "tune"))
    if features is not None:
        set_linear_head(model, classifier, probe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        rows = train_classifier(model, classifier, unfreeze, train_items, train_targets, preprocessing, augment,
                                plan, device, validation, start=start, history=history)
    best = next((row for row in reversed(rows) if row.get("best")), None) if validation is not None else None
    chosen_tta = None if tta == "auto" else tta
    if tta == "auto" and best is not None:
        chosen_tta = choose_tta(model, best, validation, preprocessing, plan, device)
    if best is not None and best["phase"] == "probe":
        # The frozen pipeline won: the probe refitted on every image, as the README's pipeline is.
        set_linear_head(model, classifier, linear_probe(features, targets, n_classes, class_weight=class_weight))
        best["refitted"] = True
    elif best is not None and initial is not None:
        # Training won: the same training again on every image, for as many epochs as the kept state had
        # ("kept") or for the whole schedule ("all": the split chose fine-tuning, not its length).
        validated_state = copy.deepcopy(model.state_dict()) if refit == "average" else None
        model.load_state_dict(initial)
        if features is not None:
            set_linear_head(model, classifier, linear_probe(features, targets, n_classes, class_weight=class_weight))
        length = None if refit_epochs == "all" else int(best["epoch"]) - trained_before
        again = dataclasses.replace(plan, n_iter_no_change=None, stop_after=length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(plan.seed)
            refitted = train_classifier(model, classifier, unfreeze, items, targets, preprocessing, augment,
                                        again, device)
        rows += [{**row, "phase": "refit"} for row in refitted]
        best["refitted"] = True
        if validated_state is not None and refitted:
            average_weights(model, validated_state)
            rows[-1]["mean_with_kept"] = True
    _mark_final(rows, best)
    return FineTuning(rows, best, chosen_tta)


def choose_tta(model: nn.Module, row: dict[str, Any], validation: tuple[Sequence[Any], np.ndarray],
               preprocessing: Preprocessing, plan: TrainingPlan, device: torch.device) -> str | None:
    """``"flip"`` if the kept state scores better on the validation split with each image averaged with its mirror.

    Whether a mirror image is the same class is a fact about the data:
    photos, yes; digits and text, no. The validation split is asked, for
    the state it kept (``row``, whose plain scores it holds), by the order
    that ranks the epochs: accuracy first, then log-loss; its answer is
    only as sure as its size allows. The flipped
    scores join ``row`` (``valid_accuracy_flip``, ``valid_loss_flip``) and
    the choice too (``tta``). A refit keeps the choice: it trains the same
    way on more images.
    """
    metrics = evaluate(FlipAveraged(model), validation[0], validation[1], preprocessing, plan.class_weights,
                       plan.batch_size, device, plan.max_image_pixels)
    model.eval()
    row["valid_accuracy_flip"], row["valid_loss_flip"] = metrics["valid_accuracy"], metrics["valid_loss"]
    flipped = (metrics["valid_accuracy"], -metrics["valid_loss"])
    row["tta"] = "flip" if flipped > (row["valid_accuracy"], -row["valid_loss"]) else None
    return row["tta"]


def average_weights(model: nn.Module, other: dict[str, torch.Tensor]) -> None:
    """Set ``model``'s floating-point weights and buffers to their mean with ``other``'s (in place).

    Two fine-tunings of one pretrained network (here: on the validation
    split's training part and again on every image) stay in one basin of the
    loss, where the mean of their weights tends to score as well as either
    or better, and to vary less between seeds (Wortsman et al., "Model soups", 2022;
    Neyshabur et al., "What is being transferred in transfer learning?",
    2020). Integer buffers (BatchNorm's step counts) keep ``model``'s values.

    Examples
    --------
    >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    >>> expected = (a.weight + b.weight).detach() / 2
    >>> average_weights(a, b.state_dict())
    >>> torch.allclose(a.weight, expected)
    True
    """
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.is_floating_point():
                tensor.add_(other[name].to(tensor.device)).mul_(0.5)


def _mark_final(rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """Mark the row whose state the model holds (``final``) and whether held-out images scored that very state.

    ``validated`` is True only where the final model is the state the
    validation split scored; a refit (even the probe's, which is then the
    frozen pipeline on every image) and a fit without a split are not
    validated, and the history says so instead of leaving it to be inferred.
    """
    for row in rows:  # a warm start's earlier fit no longer describes the model
        row.pop("final", None)
        row.pop("validated", None)
    if not rows:
        return
    if best is not None and not best.get("refitted"):
        final, validated = best, True
    elif best is not None and best["phase"] == "probe":
        final, validated = best, False  # the probe refitted on every image: the frozen pipeline
    else:
        final, validated = rows[-1], False  # the refit's last epoch, or the last epoch without a split
    final["final"] = True
    final["validated"] = validated


def _batchnorm_to_eval(model: nn.Module, trainable: set[str], freeze_all: bool) -> None:
    """BatchNorm layers keep their running statistics: all of them, or those with no trainable parameter.

    Keeping every BatchNorm in inference mode (Keras' transfer-learning
    guide) keeps the statistics the pretrained features, and a linear probe
    on them, were computed with: on small data sets, statistics re-estimated
    from a few augmented batches move the features away from the head.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            if freeze_all or not any(p in trainable for p in own):
                module.eval()


def _param_groups(model: nn.Module, classifier: str, groups: list[list[str]], plan: TrainingPlan):
    """AdamW groups: the head at the learning rate, each layer group below it at its own.

    As timm's ``param_groups_weight_decay``: biases, norm weights and other
    1-D parameters, and those the model names in ``no_weight_decay()``, are
    not decayed, so each group is split in two.
    """
    params = dict(model.named_parameters())
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    head = [n for n in params if n == classifier or n.startswith(classifier + ".")]
    result = _decay_split(params, head, plan.learning_rate, "head", plan.weight_decay, skip)
    base = plan.learning_rate * plan.backbone_lr_ratio
    for depth, names in enumerate(reversed(groups)):  # depth 0: the group nearest the head
        lr = base * (plan.layer_decay ** depth if plan.layer_decay else 1.0)
        result += _decay_split(params, names, lr, f"group-{depth}", plan.weight_decay, skip)
    return result


def _decay_split(params: dict, names: list[str], lr: float, name: str, weight_decay: float, skip: set) -> list:
    """One rate group as a decayed and a no-decay group.

    timm's rule (``timm.optim.param_groups_weight_decay``: no decay for 1-d
    tensors, biases and the model's ``no_weight_decay`` names), applied
    within each rate group: timm's function takes a whole model and returns
    two groups at one rate, so it cannot split the per-stage groups here.
    """

    def decayed(n: str) -> bool:
        return params[n].ndim > 1 and not n.endswith(".bias") and n not in skip

    parts = [([params[n] for n in names if decayed(n)], weight_decay, name),
             ([params[n] for n in names if not decayed(n)], 0.0, f"{name}-no-decay")]
    return [{"params": ps, "lr": lr, "weight_decay": wd, "name": label} for ps, wd, label in parts if ps]


def _schedule(optimizer, plan: TrainingPlan, steps_per_epoch: int, epochs: int):
    """torch's schedulers, stepped once per batch: linear warm-up, then cosine to 0 (or constant), or one-cycle.

    Each parameter group keeps its own peak rate (the per-stage rates of
    :func:`_param_groups`): torch's schedulers scale every group's initial
    rate by the same factor, which is the meaning ``backbone_lr_ratio`` and
    ``layer_decay`` document. (timm's ``param_groups_layer_decay`` groups per
    block and stores an ``lr_scale`` that only timm's own schedulers apply.)
    """
    from torch.optim import lr_scheduler

    total = max(1, steps_per_epoch * epochs)
    if plan.schedule == "onecycle":
        return lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=min(0.5, max(plan.warmup_epochs / max(epochs, 1), 0.05)),
        )
    warmup = min(int(round(plan.warmup_epochs * steps_per_epoch)), total)
    after = (lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0) if plan.schedule == "constant"
             else lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=0.0))
    if warmup == 0:
        return after
    # The first step trains at 1/warmup of the peak, the warmup-th at the peak.
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return lr_scheduler.SequentialLR(optimizer, [ramp, after], milestones=[warmup])


def train_classifier(
    model: nn.Module,
    classifier: str,
    unfreeze: Any,
    items: Sequence[Any],
    targets: np.ndarray,
    preprocessing: Preprocessing,
    augment: Callable | None,
    plan: TrainingPlan,
    device: torch.device,
    validation: tuple[Sequence[Any], np.ndarray] | None = None,
    start: dict[str, Any] | None = None,
    history: Sequence[dict[str, Any]] = (),
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns the per-epoch history (``history``, earlier rows, first).

    Runs ``plan.head_epochs`` with only the classifier learning, then
    ``plan.epochs`` with the groups chosen by ``unfreeze``; with
    ``plan.stop_after``, only that many epochs in all run, on the schedule
    of the full length (what a refit on more images repeats). With a
    validation set, each epoch is scored on it and the best state seen is
    restored at the end (highest validation accuracy, ties to the lower
    validation log-loss, then to the earlier epoch; ``plan.keep="last"``:
    the last state); with
    ``plan.n_iter_no_change`` training stops after that many epochs without
    a better trained state. ``start`` (a history row, "epoch 0") makes the model as
    it comes in a candidate too: scored on the validation set before any
    step, and kept unless training beats it clearly (``_choose``).
    """
    geometry = augment if augment is not None else preprocessing.resize_crop
    loader_rng = torch.Generator().manual_seed(plan.seed)
    loader = image_batches(
        items, geometry, batch_size=plan.batch_size, shuffle=True, generator=loader_rng,
        max_image_pixels=plan.max_image_pixels, num_workers=plan.num_workers,
        pin_memory=device.type == "cuda", drop_last=len(items) > plan.batch_size, persistent_workers=True,
    )
    if device.type == "cpu":
        tune_allocator()  # torch's activations and gradients, every step
    weights = plan.class_weights.to(device) if plan.class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=plan.label_smoothing)
    amp_dtype = plan.autocast_dtype
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp_dtype == torch.float16)
    model.to(device=device, memory_format=torch.channels_last)
    ema = _moving_average(model, plan, max(1, len(loader)))
    scored = model if ema is None else ema.module  # what each epoch's validation scores and the fit keeps

    stale = 0
    rows: list[dict[str, Any]] = [dict(row) for row in history]
    candidates: dict[str, tuple[tuple, dict, int, np.ndarray]] = {}  # "start" and the best trained state

    def consider(row: dict, correct: np.ndarray, which: str) -> bool:
        """Keep the state if it is the best of its kind so far; True when training should stop.

        Stopping watches training's own progress, not the start's score: fine-tuning
        often dips below the probe in its first epochs (the features move before the
        head follows) and climbs past it later (8 px digits: 0.77 after one epoch,
        0.97 after eight, from 0.90).
        """
        nonlocal stale
        score = (row["valid_accuracy"], -row["valid_loss"])
        latest = which == "trained" and plan.keep == "last"  # the state a whole-schedule refit repeats
        if which not in candidates or score > candidates[which][0] or latest:
            candidates[which] = (score, copy.deepcopy(scored.state_dict()), len(rows), correct)
            stale = 0
        elif which == "trained":
            stale += 1
        rows.append(row)
        return bool(plan.n_iter_no_change) and stale >= plan.n_iter_no_change

    if start is not None and validation is not None:
        metrics, correct = evaluate(model, validation[0], validation[1], preprocessing, weights,
                                    plan.batch_size, device, plan.max_image_pixels, per_image=True)
        consider({**start, **metrics}, correct, "start")
    elif start is not None:
        rows.append(dict(start))

    stop = False
    run = 0
    phases = [("head", 0, plan.head_epochs), ("tune", unfreeze, plan.epochs)]
    for phase, phase_unfreeze, epochs in phases:
        if epochs <= 0 or stop or run == plan.stop_after:
            continue
        groups = select_trainable(model, classifier, phase_unfreeze)
        trainable = {n for g in groups for n in g} | {
            n for n, _ in model.named_parameters() if n == classifier or n.startswith(classifier + ".")
        }
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
        optimizer = torch.optim.AdamW(_param_groups(model, classifier, groups, plan), weight_decay=plan.weight_decay)
        scheduler = _schedule(optimizer, plan, max(1, len(loader)), epochs)
        for _ in range(epochs):
            if run == plan.stop_after:
                break
            run += 1
            epoch = sum(1 for r in rows if r["phase"] in ("head", "tune")) + 1
            row = _train_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, trainable, plan,
                               device, amp_dtype, items, targets, phase, preprocessing, epoch, ema)
            if ema is not None:
                row["averaged"] = True
            if validation is None:
                rows.append(row)
                continue
            metrics, correct = evaluate(scored, validation[0], validation[1], preprocessing, weights,
                                        plan.batch_size, device, plan.max_image_pixels, per_image=True)
            if consider({**row, **metrics}, correct, "trained"):
                stop = True
                break
    kept = _choose(candidates)
    if kept is not None:
        model.load_state_dict(kept[1])
        rows[kept[2]]["best"] = True
    elif ema is not None and run:
        model.load_state_dict(ema.module.state_dict())  # no validation: the averaged weights are the result
    model.eval().requires_grad_(False)
    return rows


def _moving_average(model: nn.Module, plan: TrainingPlan, steps_per_epoch: int):
    """timm's ``ModelEmaV3`` of ``model`` over about ``plan.ema_epochs`` epochs of steps, or None.

    The decay is ``1 - 1 / (ema_epochs * steps_per_epoch)``, so the window is
    the same share of training whatever the data set's size; timm's warm-up
    (``1 - (1 + step) ** -2/3``, lower early on) lets the average follow the
    first steps instead of dragging the starting weights along. Averaging
    smooths the epoch-to-epoch swing of fine-tuning on few images (the
    validation accuracy of one run moves by several points between epochs),
    so the state validation keeps, and a refit that repeats the same
    training, land where the run is on average rather than on one noisy step.
    """
    if not plan.ema_epochs:
        return None
    from timm.utils import ModelEmaV3

    decay = 1.0 - 1.0 / max(1.0, plan.ema_epochs * steps_per_epoch)
    ema = ModelEmaV3(model, decay=decay, use_warmup=True)
    ema.steps = 0  # optimiser steps so far, across phases: what timm's warm-up counts
    return ema


def _choose(candidates: dict) -> tuple | None:
    """The trained state, unless the starting one (a linear probe) is as good on the validation images.

    Training must win clearly: it must get at least 2 more validation
    images right than the start, net, and at least one standard deviation
    of the sign test on the images where the two disagree (``sqrt(b + c)``).
    A one-image gain on 49 images is noise; keeping the start then gives
    the frozen pipeline's result exactly.
    """
    trained, start = candidates.get("trained"), candidates.get("start")
    if start is None or trained is None:
        return trained or start
    won = int(np.sum(trained[3] & ~start[3]))  # right after training, wrong at the start
    lost = int(np.sum(start[3] & ~trained[3]))
    net = won - lost
    return trained if net >= 2 and net >= math.sqrt(won + lost) else start


def _train_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, trainable, plan, device,
                 amp_dtype, items, targets, phase, preprocessing, epoch, ema=None) -> dict[str, float]:
    from tqdm.auto import tqdm

    model.train()
    _batchnorm_to_eval(model, trainable, plan.freeze_batchnorm)
    total_loss, correct, seen, failures = 0.0, 0, 0, []
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    with tqdm(total=len(loader.dataset), disable=not plan.verbose, unit="img",
              desc=f"{phase} epoch {epoch}") as progress:
        for indices, batch, batch_failures in loader:
            failures += batch_failures
            if failures:
                continue  # keep scanning: one error will list every bad image
            x = preprocessing.normalize(batch.to(device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            target = torch.as_tensor(targets[indices], dtype=torch.long).to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
                loss = loss_fn(logits.float(), target)
            scaler.scale(loss).backward()
            if plan.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.steps += 1
                ema.update(model, step=ema.steps)
            total_loss += loss.item() * len(target)
            correct += (logits.argmax(1) == target).sum().item()
            seen += len(target)
            progress.update(len(target))
            progress.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.2f}")
    if failures:
        raise ImageLoadError([ImageFailure(i, describe_item(items[i]), r) for i, r in sorted(failures)])
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch,
        "phase": phase,
        "train_loss": total_loss / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "learning_rate": optimizer.param_groups[0]["lr"],
        "images_per_second": seen / seconds if seconds else float("nan"),
    }


@torch.no_grad()
def evaluate(model, items, targets, preprocessing, class_weights, batch_size, device,
             max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, per_image: bool = False):
    """Validation log-loss (plain cross-entropy, class-weighted where asked) and accuracy, eval geometry.

    float32 and the prediction path's geometry, whatever the training
    precision, so that every epoch, the probe's included, is scored alike.
    With ``per_image``, also whether each image was classified right.
    """
    model.eval()
    logits, failures = extract_features(model, preprocessing, items, batch_size=batch_size, device=device,
                                        max_image_pixels=max_pixels)
    if failures:
        raise ImageLoadError(failures)
    logits, target = torch.from_numpy(logits), torch.as_tensor(np.asarray(targets), dtype=torch.long)
    weight = None if class_weights is None else class_weights.to("cpu")
    loss = nn.functional.cross_entropy(logits, target, weight=weight).item()
    correct = (logits.argmax(1) == target).numpy()
    metrics = {"valid_loss": loss, "valid_accuracy": float(correct.mean())}
    return (metrics, correct) if per_image else metrics
