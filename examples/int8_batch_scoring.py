"""
int8 batch scoring: the same pipeline in float32 and int8, compared before you ship it
======================================================================================

Usage::

    python examples/int8_batch_scoring.py [PHOTOS_DIR] [--out int8.onnx]

Fits the frozen pipeline twice, ``PretrainedFeatures()`` and
``PretrainedFeatures(precision="int8")`` (the second also calibrates the network on up to 300
training images), then prints for the held-out images: each one's accuracy, how often their
labels agree, and each one's images/s; last, it exports the int8 pipeline to one ONNX file and
checks that the file gives the same labels. PHOTOS_DIR holds one subfolder per class (or train/
and test/); without it, scikit-learn's handwritten digits (installed, no download). Needs ONNX
Runtime (the ``export`` extra). Runs offline.
"""

import argparse
import tempfile
import time
from pathlib import Path

from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import skltransfer
from skltransfer import OnnxModel, PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.datasets import write_digits_folder

parser = argparse.ArgumentParser(description="The same pipeline in float32 and int8, compared.")
parser.add_argument("photos", nargs="?", type=Path, help="one subfolder per class, or train/ and test/ "
                    "(default: scikit-learn's digits)")
parser.add_argument("--out", type=Path, default=Path("int8.onnx"), help="where to export the int8 pipeline")
args = parser.parse_args()
root = args.photos or write_digits_folder(Path(tempfile.mkdtemp(prefix="skltransfer-int8-")) / "digits",
                                          max_images=600)
if (root / "train").is_dir():
    train, y_train = load_image_folder(root / "train")
    test, y_test = load_image_folder(root / "test")
else:
    train, test, y_train, y_test = stable_train_test_split(*load_image_folder(root), test_size=0.25)

# cache=None: time the network, not the feature cache (which would serve the second run's rows)
float_clf = make_pipeline(PretrainedFeatures(cache=None), LogisticRegression(max_iter=1000)).fit(train, y_train)
int8_clf = clone(float_clf).set_params(pretrainedfeatures__precision="int8").fit(train, y_train)
print(f"{len(train)} training images, {len(test)} held out; int8 calibrated on "
      f"{int8_clf[0].calibration_.images} of them")

labels = {}
for name, clf in (("float32", float_clf), ("int8", int8_clf)):
    clf.predict(test[:8])  # the engine built and warm
    start = time.perf_counter()
    labels[name] = clf.predict(test)
    seconds = time.perf_counter() - start
    accuracy = (labels[name] == y_test).mean()
    print(f"{name:>7}: accuracy {accuracy:.1%}, {len(test) / seconds:.0f} images/s")
print(f"labels that agree: {(labels['float32'] == labels['int8']).mean():.1%}")

path = skltransfer.export(int8_clf, args.out)
exported = OnnxModel(path).predict(test)
print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB): "
      f"{(exported == labels['int8']).mean():.1%} of its labels are the library's int8 labels")
