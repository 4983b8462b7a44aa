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
import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .decoding import DEFAULT_MAX_IMAGE_PIXELS, ImageFailure, ImageLoadError, describe_item
from .inference import extract_features, image_batches
from .preprocessing import Preprocessing

__all__ = ["TrainingPlan", "layer_groups", "select_trainable", "train_classifier", "training_augmentation"]


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


def training_augmentation(preprocessing: Preprocessing, scale=(0.35, 1.0)) -> Callable:
    """timm-style training geometry on uint8 tensors: random resized crop + horizontal flip.

    ``scale`` (0.35, 1): the lower bound fastai uses for fine-tuning on small
    data sets; timm's ImageNet-from-scratch default (0.08) is harsher.
    """
    from torchvision.transforms import v2

    from .preprocessing import _INTERPOLATIONS

    return v2.Compose([
        v2.RandomResizedCrop(list(preprocessing.input_size), scale=scale,
                             interpolation=_INTERPOLATIONS[preprocessing.interpolation], antialias=True),
        v2.RandomHorizontalFlip(),
    ])


# -- the plan and the loop ------------------------------------------------------------


@dataclass
class TrainingPlan:
    """Everything the loop needs besides the model and the data."""

    epochs: int = 10
    head_epochs: int = 0
    learning_rate: float = 1e-3
    backbone_lr_ratio: float = 0.1
    layer_decay: float | None = None
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    max_grad_norm: float | None = 1.0
    batch_size: int = 32
    num_workers: int = 0
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    n_iter_no_change: int | None = None
    class_weights: torch.Tensor | None = None
    verbose: bool = False
    seed: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _frozen_batchnorm_to_eval(model: nn.Module, trainable: set[str]) -> None:
    """BatchNorm layers with no trainable parameter keep their running statistics."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            if not any(p in trainable for p in own):
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
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns the per-epoch history.

    Runs ``plan.head_epochs`` with only the classifier learning, then
    ``plan.epochs`` with the groups chosen by ``unfreeze``. With a
    validation set and ``plan.n_iter_no_change``, stops when the validation
    loss has not improved for that many epochs and restores the best weights.
    """
    geometry = augment if augment is not None else preprocessing.resize_crop
    loader_rng = torch.Generator().manual_seed(plan.seed)
    loader = image_batches(
        items, geometry, batch_size=plan.batch_size, shuffle=True, generator=loader_rng,
        max_image_pixels=plan.max_image_pixels, num_workers=plan.num_workers,
        pin_memory=device.type == "cuda", drop_last=len(items) > plan.batch_size,
    )
    weights = plan.class_weights.to(device) if plan.class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=plan.label_smoothing)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    model.to(device=device, memory_format=torch.channels_last)

    best = (math.inf, None, -1)
    stale = 0
    phases = [("head", 0, plan.head_epochs), ("tune", unfreeze, plan.epochs)]
    for phase, phase_unfreeze, epochs in phases:
        if epochs <= 0:
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
            row = _train_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, trainable, plan,
                               device, use_amp, amp_dtype, items, targets, phase, preprocessing)
            if validation is not None:
                row.update(evaluate(model, validation[0], validation[1], preprocessing, loss_fn,
                                    plan.batch_size, device, plan.max_image_pixels))
                if row["valid_loss"] < best[0] - 1e-4:
                    best = (row["valid_loss"], copy.deepcopy(model.state_dict()), len(plan.history))
                    stale = 0
                else:
                    stale += 1
            plan.history.append(row)
            if validation is not None and plan.n_iter_no_change and stale >= plan.n_iter_no_change:
                break
        if validation is not None and plan.n_iter_no_change and stale >= plan.n_iter_no_change:
            break
    if best[1] is not None and plan.n_iter_no_change:
        model.load_state_dict(best[1])
        plan.history[best[2]]["best"] = True
    model.eval().requires_grad_(False)
    return plan.history


def _train_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, trainable, plan, device,
                 use_amp, amp_dtype, items, targets, phase, preprocessing) -> dict[str, float]:
    from tqdm.auto import tqdm

    model.train()
    _frozen_batchnorm_to_eval(model, trainable)
    epoch = len(plan.history) + 1
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
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(x)
                loss = loss_fn(logits.float(), target)
            scaler.scale(loss).backward()
            if plan.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
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
def evaluate(model, items, targets, preprocessing, loss_fn, batch_size, device,
             max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, float]:
    """Validation loss and accuracy with the eval geometry (the prediction path)."""
    model.eval()
    logits, failures = extract_features(model, preprocessing, items, batch_size=batch_size, device=device,
                                        max_image_pixels=max_pixels)
    if failures:
        raise ImageLoadError(failures)
    logits, target = torch.from_numpy(logits), torch.as_tensor(np.asarray(targets), dtype=torch.long)
    weight = None if loss_fn.weight is None else loss_fn.weight.to("cpu")
    loss = nn.functional.cross_entropy(logits, target, weight=weight, label_smoothing=loss_fn.label_smoothing).item()
    return {"valid_loss": loss, "valid_accuracy": (logits.argmax(1) == target).float().mean().item()}
