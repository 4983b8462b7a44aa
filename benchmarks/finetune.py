"""Fine-tuning vs frozen features, and training speed, in one run.

For each data set: test accuracy of frozen default-backbone features + LogisticRegression
vs FineTuneClassifier with unfreeze=0, 2 and "all" (training images/s beside each); then
FineTuneClassifier's per-epoch training throughput vs a hand-written timm training loop
with the same settings (model, augmentation, batch size, AdamW, unfreeze="all"); last,
prediction speed through the folded copy predict uses vs through the model as trained.

    python benchmarks/finetune.py [--data ../shared/data] [--epochs 10]
        [--flowers-per-class 100] [--flowers-epochs 5] [--skip hymenoptera flowers5 speed predict]

flowers5 is subsampled (stable: the first N per class of a hash split) because
fine-tuning all 3,458 training images for 10 epochs takes hours on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skltransfer import FineTuneClassifier, PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.backbones import load_classifier
from skltransfer.inference import extract_features, image_batches, resolve_batch_size
from skltransfer.training import training_augmentation

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def hand_written_loop(paths, labels, epochs: int = 1, batch_size: int = 32) -> float:
    """The tutorials' loop: timm model, same augmentation, AdamW, cross-entropy. Returns images/s."""
    classes, targets = np.unique(labels, return_inverse=True)
    model, pre, _ = load_classifier("tf_efficientnet_lite0", "pretrained", len(classes))
    model.train()
    loader = image_batches(paths, training_augmentation(pre), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    targets = torch.as_tensor(targets)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for indices, batch, _ in loader:
            x, target = pre.normalize(batch), targets[indices]
            optimizer.zero_grad()
            loss_fn(model(x), target).backward()
            optimizer.step()
            seen += len(target)
    return seen / (time.perf_counter() - start)


def compare(name, train, test, y_train, y_test, epochs):
    frozen = make_pipeline(PretrainedFeatures(), StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
    frozen.fit(train, y_train)
    print(f"{name:<12} frozen features + LogisticRegression: {frozen.score(test, y_test):6.1%}", flush=True)
    for unfreeze in (0, 2, "all"):
        clf = FineTuneClassifier(unfreeze=unfreeze, epochs=epochs, random_state=0)
        start = time.perf_counter()
        clf.fit(train, y_train)
        seconds = time.perf_counter() - start
        speed = np.mean([h["images_per_second"] for h in clf.history_])
        print(f"{name:<12} FineTuneClassifier(unfreeze={unfreeze!r:>5}, epochs={epochs}): "
              f"{clf.score(test, y_test):6.1%}  ({speed:5.1f} training images/s, {seconds:5.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--flowers-per-class", type=int, default=100)
    parser.add_argument("--flowers-epochs", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], help="hymenoptera, flowers5, speed or predict")
    args = parser.parse_args()
    if "hymenoptera" not in args.skip:
        train, y_train = load_image_folder(args.data / "hymenoptera" / "train")
        test, y_test = load_image_folder(args.data / "hymenoptera" / "test")
        compare("hymenoptera", train, test, y_train, y_test, args.epochs)
    if "flowers5" not in args.skip:
        paths, labels = load_image_folder(args.data / "flowers5")
        train, test, y_train, y_test = stable_train_test_split(paths, labels, test_size=0.2)
        keep = np.concatenate([np.flatnonzero(y_train == c)[: args.flowers_per_class] for c in np.unique(y_train)])
        compare(f"flowers5[{len(keep)}]", [train[i] for i in keep], test, y_train[keep], y_test, args.flowers_epochs)
    if "speed" not in args.skip:
        train, y_train = load_image_folder(args.data / "hymenoptera" / "train")
        ours = FineTuneClassifier(unfreeze="all", epochs=1, head_epochs=0, random_state=0, max_grad_norm=None,
                                  label_smoothing=0.1).fit(train, y_train).history_[0]["images_per_second"]
        theirs = hand_written_loop(train, y_train)
        print(f"training throughput, unfreeze='all', batch 32: ours {ours:.1f} images/s, "
              f"hand-written timm loop {theirs:.1f} images/s: {ours / theirs:.2f}x (goal >= 0.8x)")
    if "predict" not in args.skip:
        prediction_speed(args.data / "hymenoptera")


def prediction_speed(folder: Path, repeats: int = 3) -> None:
    """predict_proba through the folded copy vs through ``model_`` as trained, same images."""
    train, y_train = load_image_folder(folder / "train")
    test, _ = load_image_folder(folder / "test")
    clf = FineTuneClassifier(unfreeze=2, epochs=1, random_state=0, engine="torch").fit(train[::4], y_train[::4])
    clf.predict_proba(test[:8])  # the folded copy is made here

    def as_trained(paths):  # what predict ran before: the trained module itself
        batch_size = resolve_batch_size("auto", torch.device("cpu"), clf.preprocessing_.input_size)
        return extract_features(clf.model_.eval(), clf.preprocessing_, paths, batch_size=batch_size)[0]

    timings: dict[str, list[float]] = {"folded": [], "as trained": []}
    logits = {}
    for _ in range(repeats):  # interleaved, best of each: the machine is noisy
        for name, run in (("folded", clf.decision_function), ("as trained", as_trained)):
            start = time.perf_counter()
            logits[name] = run(test)
            timings[name].append(time.perf_counter() - start)
    folded, trained = min(timings["folded"]), min(timings["as trained"])
    as_trained_margin = logits["as trained"][:, 1] - logits["as trained"][:, 0]  # decision_function, 2 classes
    gap = np.abs(logits["folded"] - as_trained_margin).max()
    print(f"FineTuneClassifier.predict_proba on {len(test)} photos: "
          f"folded copy {len(test) / folded:.1f} images/s, "
          f"model as trained {len(test) / trained:.1f} images/s: {trained / folded:.2f}x "
          f"(best of {repeats}; largest logit difference {gap:.1e})")


if __name__ == "__main__":
    main()
