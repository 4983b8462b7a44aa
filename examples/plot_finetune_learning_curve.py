"""
Fine-tuning from the frozen pipeline: the learning curve
========================================================

``FineTuneClassifier()`` starts where the frozen pipeline ends: its head is the
README's linear probe on frozen features ("epoch 0"), then the whole network trains
at a small learning rate with BatchNorm statistics frozen, and each epoch is scored on
a held-out fifth of the training images. It keeps the probe unless training beats it
clearly on those images, so it is never worse than frozen features where fine-tuning
cannot help, and takes the gain where it can.

By default this runs on scikit-learn's 8 x 8 handwritten digits written out as PNG
files (installed with scikit-learn: no download), far from ImageNet's photos, where
fine-tuning pays. Pass a folder with ``train/`` and ``test/`` class folders to use
your own images. A few minutes on 2 CPU cores for 600 digits; the documentation's
gallery runs it on 140 digits for at most 4 epochs (``--max-images 140 --epochs 4``), to
build in well under a minute; the figure's title says which state that small run kept.

Small images train faster at a smaller input (``--input-size auto``: 160 px for these 8 px
digits, about half the compute of the weights' 224 px; the figure's title says the size).
By default each epoch is scored, and kept, as a moving average of the weights over about one
epoch (``--ema-epochs 0``: the raw weights, whose validation curve
swings more). ``--refit-epochs kept`` stops early, keeps the best epoch and refits a fine-tuned
winner for that many epochs, instead of validating and refitting the whole schedule
(the default); compare the curves and the test accuracy on your images. ``--tta auto``
lets the validation split decide whether predictions average each image with its mirror
(a triangle marks the kept state's validation accuracy with mirrors; digits are not the
same digit in a mirror, so there it should not mirror).

Usage::

    python examples/plot_finetune_learning_curve.py [IMAGES_DIR] [--max-images 600] [--epochs 8]
        [--input-size auto|160] [--ema-epochs 1] [--refit-epochs kept|all] [--tta flip|auto]
        [--out learning_curve.png]
"""

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from skltransfer import FineTuneClassifier, load_image_folder, stable_train_test_split
from skltransfer.datasets import write_digits_folder

parser = argparse.ArgumentParser()
parser.add_argument("images", nargs="?", type=Path, help="a folder with train/ and test/ class folders")
parser.add_argument("--max-images", type=int, default=600, help="digits to use (without IMAGES_DIR)")
parser.add_argument("--epochs", type=int, default=8, help="most fine-tuning epochs (FineTuneClassifier's default: 8)")
parser.add_argument("--input-size", type=lambda s: s if s == "auto" else int(s),
                    help="the size the network sees: pixels, or 'auto' (default: the weights' own, 224)")
parser.add_argument("--ema-epochs", type=float, help="average the weights over about this many epochs (0: none)")
parser.add_argument("--refit-epochs", choices=["kept", "all"], help="how long a fine-tuned winner is refitted")
parser.add_argument("--tta", choices=["flip", "auto"], help="mirrored predictions (auto: if the split says so)")
parser.add_argument("--out", default="learning_curve.png")
args, _ = parser.parse_known_args()  # sphinx-gallery passes its own arguments

with tempfile.TemporaryDirectory() as tmp:
    if args.images is None:
        paths, labels = load_image_folder(write_digits_folder(Path(tmp) / "digits", args.max_images))
        train, test, y_train, y_test = stable_train_test_split(paths, labels, test_size=0.25)
        what = f"{len(paths)} handwritten digits (8 x 8 px)"
    else:
        train, y_train = load_image_folder(args.images / "train")
        test, y_test = load_image_folder(args.images / "test")
        what = str(args.images)
    chosen = {k: v for k, v in (("input_size", args.input_size), ("refit_epochs", args.refit_epochs),
                                            ("tta", args.tta)) if v is not None}
    if args.ema_epochs is not None:
        chosen["ema_epochs"] = args.ema_epochs or None  # 0: no averaging
    clf = FineTuneClassifier(epochs=args.epochs, random_state=0, **chosen).fit(train, y_train)
    accuracy = clf.score(test, y_test)

# %%
# The probe is epoch 0; the dotted line marks the state set against it: the
# last one (the default ``refit_epochs="all"``) or the best (``"kept"``). (When a
# fine-tuned state wins, ``fit`` then trains it again on every image, for the
# whole schedule, or as many epochs with ``"kept"``: ``phase="refit"`` rows,
# with no validation scores, not plotted here.)
history = [h for h in clf.history_ if h["phase"] != "refit"]
epochs = [h["epoch"] for h in history]
fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
tuned = [h for h in history if h["phase"] != "probe"]
loss_ax.plot([h["epoch"] for h in tuned], [h["train_loss"] for h in tuned], "o-",
             label=f"train (augmented, label smoothing {clf.label_smoothing})")
loss_ax.plot(epochs, [h["valid_loss"] for h in history], "o-", label="validation")
acc_ax.plot([h["epoch"] for h in tuned], [h["train_accuracy"] for h in tuned], "o-", label="train (augmented)")
acc_ax.plot(epochs, [h["valid_accuracy"] for h in history], "o-", label="validation")
kept_row = next((h for h in history if h.get("best")), {})
if "valid_accuracy_flip" in kept_row:  # tta="auto" scored the kept state with mirrors too
    acc_ax.plot([kept_row["epoch"]], [kept_row["valid_accuracy_flip"]], "v", color="tab:red",
                label=f"kept state with mirrors (tta_={clf.tta_!r})")
for ax in (loss_ax, acc_ax):
    ax.axvspan(-0.4, 0.4, color="tab:green", alpha=0.12, label="epoch 0: linear probe on frozen features")
    if clf.best_epoch_ is not None:
        ax.axvline(clf.best_epoch_, color="grey", linestyle=":", label=f"kept: epoch {clf.best_epoch_}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
loss_ax.set_ylabel("cross-entropy")
acc_ax.set_ylabel("accuracy")
kept = "the frozen pipeline (probe)" if clf.best_epoch_ == 0 else f"fine-tuned, epoch {clf.best_epoch_}"
acc_ax.set_title(f"test accuracy {accuracy:.1%}: {kept}", fontsize=10)
options = ", ".join(f"{k}={v!r}" for k, v in chosen.items())
size = "x".join(map(str, clf.preprocessing_.input_size))
fig.suptitle(f"FineTuneClassifier({options}) on {what}, at {size} px", fontsize=11)
fig.tight_layout()
fig.savefig(args.out, dpi=110)
refits = sum(h["phase"] == "refit" for h in clf.history_)
print(f"probe (epoch 0) validation accuracy {history[0]['valid_accuracy']:.1%}; kept epoch {clf.best_epoch_}; "
      f"refitted for {refits} epochs; predictions mirrored: {clf.tta_ == 'flip'}")
print(f"test accuracy {accuracy:.1%} on {len(test)} images; wrote {args.out}")
