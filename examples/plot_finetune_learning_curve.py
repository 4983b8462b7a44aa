"""Fine-tune the default backbone on ants vs bees and plot its learning curve.

    python examples/plot_finetune_learning_curve.py [PHOTOS_DIR] [--epochs 8] [--out learning_curve.png]

PHOTOS_DIR/train and PHOTOS_DIR/test (default ../shared/data/hymenoptera). One head-only
epoch, then the last 2 layer groups unfrozen at a 10x lower learning rate; a stratified
10 % of the training images is held out for validation (early stopping restores the
best epoch). Plots train / validation loss and validation accuracy per epoch, and prints
the test accuracy. About 5 minutes on 2 CPU cores. Needs matplotlib.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from skltransfer import FineTuneClassifier, load_image_folder

parser = argparse.ArgumentParser()
parser.add_argument("photos", nargs="?", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/hymenoptera")
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--out", default="learning_curve.png")
args = parser.parse_args()

train, y_train = load_image_folder(args.photos / "train")
test, y_test = load_image_folder(args.photos / "test")
clf = FineTuneClassifier(unfreeze=2, head_epochs=1, epochs=args.epochs, early_stopping=True,
                         validation_fraction=0.1, n_iter_no_change=3, random_state=0, verbose=True)
clf.fit(train, y_train)
accuracy = clf.score(test, y_test)

epochs = [h["epoch"] for h in clf.history_]
fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
loss_ax.plot(epochs, [h["train_loss"] for h in clf.history_], "o-", label="train (augmented)")
loss_ax.plot(epochs, [h["valid_loss"] for h in clf.history_], "o-", label="validation")
acc_ax.plot(epochs, [h["train_accuracy"] for h in clf.history_], "o-", label="train (augmented)")
acc_ax.plot(epochs, [h["valid_accuracy"] for h in clf.history_], "o-", label="validation")
for ax in (loss_ax, acc_ax):
    best = next((h["epoch"] for h in clf.history_ if h.get("best")), None)
    if best:
        ax.axvline(best, color="grey", linestyle=":", label=f"best epoch ({best}), restored")
    if clf.head_epochs:
        ax.axvspan(0.5, clf.head_epochs + 0.5, color="tab:orange", alpha=0.1, label="head only")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
loss_ax.set_ylabel("cross-entropy (label smoothing 0.1)")
acc_ax.set_ylabel("accuracy")
acc_ax.set_title(f"test accuracy after fine-tuning: {accuracy:.1%}")
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"test accuracy {accuracy:.1%} on {len(test)} images; wrote {args.out}")
