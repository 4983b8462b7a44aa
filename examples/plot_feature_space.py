"""
What the backbone sees: a 2-D map of pretrained features, and where the classifier errs
=======================================================================================


Usage::

    python examples/plot_feature_space.py [PHOTOS_DIR] [--out feature_space.png]

Extracts default-backbone features for a folder of images (default: the demo's 8 x 8
digits, installed with scikit-learn; 400 images a class at most), then draws
(left) the images' features projected on their first two principal components,
coloured by class: clusters mean the frozen features already separate the classes;
(right) the confusion matrix of a LogisticRegression on those features, on a stable
held-out split. Writes a PNG. Needs matplotlib (pip install skltransfer[examples]).
"""

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import ConfusionMatrixDisplay
from sklearn.preprocessing import StandardScaler

from skltransfer import PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.datasets import write_digits_folder

parser = argparse.ArgumentParser()
parser.add_argument("photos", nargs="?", type=Path, help="class folders (default: the demo's digits)")
parser.add_argument("--per-class", type=int, default=400)
parser.add_argument("--out", default="feature_space.png")
args = parser.parse_args()

# Your folders, else the demo's 8 x 8 digits (installed with scikit-learn: no download).
folder = args.photos or write_digits_folder(Path(tempfile.mkdtemp(prefix="skltransfer-example-")) / "digits")
paths, labels = load_image_folder(folder)
keep = np.concatenate([np.flatnonzero(labels == c)[: args.per_class] for c in np.unique(labels)])
paths, labels = [paths[i] for i in keep], labels[keep]

features = PretrainedFeatures(verbose=True).fit_transform(paths)
_, _, train, test = stable_train_test_split(paths, np.arange(len(paths)), test_size=0.25)
scaler = StandardScaler().fit(features[train])
head = LogisticRegression(max_iter=2000).fit(scaler.transform(features[train]), labels[train])
accuracy = head.score(scaler.transform(features[test]), labels[test])

fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
xy = PCA(n_components=2, random_state=0).fit_transform(scaler.transform(features))
for name in np.unique(labels):
    mask = labels == name
    left.scatter(xy[mask, 0], xy[mask, 1], s=9, alpha=0.6, label=name)
left.set(title=f"{len(paths)} images, frozen tf_efficientnet_lite0 features (PCA)",
         xlabel="PC 1", ylabel="PC 2")
left.legend(markerscale=2)
ConfusionMatrixDisplay.from_estimator(
    head, scaler.transform(features[test]), labels[test], ax=right, colorbar=False, cmap="Blues"
)
right.set_title(f"LogisticRegression on held-out images: {accuracy:.1%} accuracy")
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"held-out accuracy {accuracy:.1%}; wrote {args.out}")
