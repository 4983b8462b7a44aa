"""
Serving without the training stack: export to ONNX, score with ONNX Runtime alone
=================================================================================

Fit the README's pipeline, write it as one ONNX file with :func:`skltransfer.export`, and
score images with nothing but ``onnxruntime``, ``numpy`` and ``Pillow``: the file resizes,
crops and normalises the pixels itself, so a decoder is all a serving process needs.

Usage::

    python examples/serve_onnx.py [PHOTOS_DIR] [--out model.onnx]

PHOTOS_DIR holds one subfolder per class (or train/ and test/). Without it, scikit-learn's
handwritten digits as PNG files (``skltransfer.datasets.write_digits_folder``): no network
needed. Needs ``pip install "skltransfer[export]"``.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import skltransfer
from skltransfer import PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.datasets import write_digits_folder

parser = argparse.ArgumentParser(description="Export a fitted pipeline to ONNX and score it without torch.")
parser.add_argument("photos", nargs="?", type=Path, help="class-per-folder images (default: the demo's digits)")
parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "model.onnx", help="the ONNX file")
args = parser.parse_args()

root = args.photos or write_digits_folder(Path(tempfile.mkdtemp()) / "digits", 300)
if (root / "train").is_dir():
    train, y_train = load_image_folder(root / "train")
    test, y_test = load_image_folder(root / "test")
else:
    train, test, y_train, y_test = stable_train_test_split(*load_image_folder(root), test_size=0.25)

clf = make_pipeline(PretrainedFeatures(), LogisticRegression(max_iter=1000)).fit(train, y_train)
path = skltransfer.export(clf, args.out)
print(f"exported to {path} ({path.stat().st_size / 2**20:.1f} MiB)")

# What a serving process runs: no torch, no scikit-learn, no skltransfer.
import onnxruntime  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

session = onnxruntime.InferenceSession(str(path))
labels, agree = [], 0
for image_path, expected in zip(test, clf.predict_proba(test)):
    pixels = np.asarray(ImageOps.exif_transpose(Image.open(image_path)).convert("RGB"))
    label, probabilities = session.run(None, {"image": pixels[None]})
    labels.append(label[0])
    agree += int(np.argmax(probabilities[0]) == np.argmax(expected))
labels = np.asarray(labels)
print(f"ONNX Runtime: accuracy {np.mean(labels == y_test):.1%} on {len(test)} images; "
      f"the same label as the pipeline on {agree} of {len(test)}")
print(f"from a shell: skltransfer predict {path} IMAGES --out predictions.csv")
