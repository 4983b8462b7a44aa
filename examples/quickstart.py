"""
Quickstart: an image classifier from a folder of photos, saved as one file
==========================================================================


Usage::

    python examples/quickstart.py [PHOTOS_DIR]

PHOTOS_DIR holds one subfolder per class (or train/ and test/). Without it, the ants
and bees photos of PyTorch's transfer-learning tutorial
(``skltransfer.datasets.fetch_hymenoptera``: downloaded once, 47 MB, into
``$SKLTRANSFER_DATA`` or ``~/.cache/skltransfer/datasets``); offline, scikit-learn's
handwritten digits, which install with it. The default backbone's ImageNet weights ship with
the package: this runs with no network.
"""

import argparse
import tempfile
from pathlib import Path

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import skltransfer
from skltransfer import PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.datasets import DatasetUnavailableError, fetch_hymenoptera, write_digits_folder

parser = argparse.ArgumentParser(description="An image classifier from a folder of photos, saved as one file.")
parser.add_argument("photos", nargs="?", type=Path,
                    help="one subfolder per class, or train/ and test/ (default: the ants and bees photos)")
args = parser.parse_args()
try:
    root = args.photos or fetch_hymenoptera()
except DatasetUnavailableError as exc:  # offline: digits that come with scikit-learn instead
    print(f"{exc}\nUsing scikit-learn's handwritten digits instead (installed, no download).")
    root = write_digits_folder(Path(tempfile.mkdtemp(prefix="skltransfer-quickstart-")) / "digits")
if (root / "train").is_dir():
    train, y_train = load_image_folder(root / "train")
    test, y_test = load_image_folder(root / "test")
else:
    train, test, y_train, y_test = stable_train_test_split(*load_image_folder(root), test_size=0.2)

clf = make_pipeline(PretrainedFeatures(verbose=True), LogisticRegression(max_iter=1000))
clf.fit(train, y_train)
print(f"test accuracy: {clf.score(test, y_test):.1%} on {len(test)} images")
for path, label in zip(test[:3], clf.predict(test[:3])):
    print(f"  {path} -> {label}")
skltransfer.save(clf, "quickstart.skops")  # skltransfer.load reads it back without running code
print("saved quickstart.skops")
