"""Weight-space ensembles of the probe and the fine-tuned network (WiSE-FT) on flowers5 at 100 a class.

Wortsman et al. 2022 ("Robust fine-tuning of zero-shot models") mix the starting weights
(here: the pretrained network with the linear-probe head, FineTuneClassifier's "epoch 0") and the
fine-tuned ones, ``(1 - alpha) * start + alpha * tuned``, and often beat both ends. This script asks
whether that would let ``FineTuneClassifier()`` gain on flowers5 at 100 a class, the set where its
defaults keep the probe. It scores every mix on a *dev* set that is neither the training images nor
the test split: the next 200 images a class of the same stable 80/20 training split
(``benchmarks/finetune.py`` trains on the first 100 a class and tests on the 859).

- ``--mode split`` (the defaults' own path): the probe and the best fine-tuned state as the
  validation split saw them (trained on 400 images), before the estimator chooses between them;
  prints each mix's validation accuracy on the 100 held-out images, whether it beats the probe
  clearly by the estimator's rule, and its dev accuracy.
- ``--mode nosplit``: ``early_stopping=False``, every epoch on all 500 images; prints each mix's
  dev accuracy, with and without ``tta="flip"``.

    python benchmarks/wise_ft.py [--data ../shared/data] [--mode split nosplit] [--seeds 0 1 2]

The two states are caught by wrapping the training internals (the library keeps only the chosen one).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from _machine import cpu_model
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import skltransfer.training as training
from skltransfer import FineTuneClassifier, PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.registry import forget_inference_copies

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPHAS = (0.0, 0.3, 0.5, 0.7, 1.0)


def flowers5_train_dev(data: Path, per_class: int = 100, dev_per_class: int = 200):
    """The fine-tuning benchmark's 100 a class, and the next ``dev_per_class`` a class as a dev set."""
    paths, labels = load_image_folder(data / "flowers5")
    train, _, y_train, _ = stable_train_test_split(paths, labels, test_size=0.2)
    rows = [np.flatnonzero(y_train == c) for c in np.unique(y_train)]
    keep = np.concatenate([r[:per_class] for r in rows])
    dev = np.concatenate([r[per_class:per_class + dev_per_class] for r in rows])
    return [train[i] for i in keep], y_train[keep], [train[i] for i in dev], y_train[dev]


def mix(start: dict, tuned: dict, alpha: float) -> dict:
    """``(1 - alpha) * start + alpha * tuned`` for float tensors; counters from ``tuned``."""
    return {k: (1 - alpha) * start[k] + alpha * v if v.is_floating_point() else v for k, v in tuned.items()}


def load_mix(clf: FineTuneClassifier, state: dict) -> None:
    clf.model_.load_state_dict(state)
    forget_inference_copies(clf.model_)


def fit_catching(X, y, module, name: str, catch, **params) -> tuple[FineTuneClassifier, float, dict]:
    """``FineTuneClassifier(**params).fit(X, y)`` with ``module.name`` wrapped so that
    ``catch(caught, *args)`` sees each call's arguments first. Returns the fitted estimator,
    the fit's seconds and ``caught``."""
    caught: dict = {}
    original = getattr(module, name)

    def catching(*args, **kwargs):
        catch(caught, *args)
        return original(*args, **kwargs)

    clf = FineTuneClassifier(**params)
    with mock.patch.object(module, name, catching):
        start_time = time.perf_counter()
        clf.fit(X, y)
    return clf, time.perf_counter() - start_time, caught


def with_split(X, y, X_dev, y_dev, seed: int) -> None:
    clf, seconds, caught = fit_catching(
        X, y, training, "_choose", lambda caught, candidates: caught.setdefault("candidates", candidates),
        random_state=seed, refit=False,
    )
    print(f"seed {seed}: fit {seconds:.0f} s, kept epoch {clf.best_epoch_}", flush=True)
    candidates = caught["candidates"]
    start, tuned = candidates["start"][1], candidates["trained"][1]
    _, targets = np.unique(y, return_inverse=True)
    split_seed = int(np.random.RandomState(seed).randint(0, 2**31 - 1))  # as fit draws it
    valid = clf._validation_split(targets, split_seed)[1]
    X_valid, y_valid = [X[i] for i in valid], y[valid]
    probe = None
    for alpha in ALPHAS:
        load_mix(clf, mix(start, tuned, alpha))
        right = clf.predict(X_valid) == y_valid
        probe = right if probe is None else probe
        won, lost = int(np.sum(right & ~probe)), int(np.sum(probe & ~right))
        # the estimator's own rule (candidates are (score, state, row, right-or-wrong per image)):
        mixed = (None, None, None, right)
        clear = training._choose({"start": (None, None, None, probe), "trained": mixed}) is mixed
        print(f"seed {seed}: alpha {alpha:.1f}: validation {right.mean():.3f} ({won} won, {lost} lost "
              f"against the probe: {'a clear' if clear else 'no clear'} win), dev {clf.score(X_dev, y_dev):.1%}",
              flush=True)


def without_split(X, y, X_dev, y_dev, seed: int) -> None:
    clf, seconds, caught = fit_catching(
        X, y, training, "train_classifier",
        lambda caught, model, *_: caught.setdefault("start", copy.deepcopy(model.state_dict())),
        random_state=seed, early_stopping=False,
    )
    print(f"seed {seed}: fit {seconds:.0f} s (no split)", flush=True)
    start, tuned = caught["start"], copy.deepcopy(clf.model_.state_dict())
    for alpha in ALPHAS:
        load_mix(clf, mix(start, tuned, alpha))
        plain = clf.score(X_dev, y_dev)
        flipped = clf.set_params(tta="flip").score(X_dev, y_dev)
        clf.set_params(tta=None)
        print(f"seed {seed}: alpha {alpha:.1f}: dev {plain:.1%}, with tta='flip' {flipped:.1%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--mode", nargs="*", default=["split", "nosplit"], choices=["split", "nosplit"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    X, y, X_dev, y_dev = flowers5_train_dev(args.data)
    frozen = make_pipeline(PretrainedFeatures(), LogisticRegression(max_iter=1000)).fit(X, y)
    print(f"flowers5: {len(X)} train, {len(X_dev)} dev; frozen README pipeline on dev: "
          f"{frozen.score(X_dev, y_dev):.1%}", flush=True)
    for mode in args.mode:
        for seed in args.seeds:
            (with_split if mode == "split" else without_split)(X, y, X_dev, y_dev, seed)


if __name__ == "__main__":
    main()
