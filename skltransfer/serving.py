"""Scoring an exported ONNX file with ONNX Runtime, numpy and Pillow: no torch.

One job: load a file written by :func:`skltransfer.export` and score images
with it, with the library's decoding (readable errors, pixel limits, EXIF
orientation, reduced JPEG decoding) and nothing else of the training stack.
Importing this module imports no torch; ``skltransfer predict model.onnx``
runs through it.

The file does its own preprocessing, so any ONNX Runtime scores it with a
decoder alone::

    import numpy as np, onnxruntime
    from PIL import Image, ImageOps
    session = onnxruntime.InferenceSession("model.onnx")
    pixels = np.asarray(ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB"))
    label, probabilities = session.run(None, {"image": pixels[None]})
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .decoding import DEFAULT_MAX_IMAGE_PIXELS, ImageFailure, ImageLoadError, as_image_items, decode_rgb_array, \
    describe_item
from .preprocessing import Preprocessing

__all__ = ["OnnxModel"]

_UNSET = object()


class OnnxModel:
    """A model exported by :func:`skltransfer.export`, scored by ONNX Runtime.

    It takes the same inputs as the estimators (paths, encoded bytes, PIL
    images, ``uint8`` arrays) and answers as they do: ``predict``,
    ``predict_proba`` and ``classes_`` for a classifier, ``transform`` for a
    features file. Images are decoded with Pillow (large JPEGs reduced in
    their DCT, as the library does), and each goes through the file's
    graph at its own size, one image per core at a time.

    Parameters
    ----------
    path : path
        The ``.onnx`` file.
    max_image_pixels : int or None, optional
        Images with more pixels are refused from their headers (an error
        naming the file). Default: the exported model's own limit.
    providers : list of str, optional
        ONNX Runtime execution providers (default: ``CPUExecutionProvider``).
    threads : int, optional
        Images scored at once, each decoded and run on one thread (default:
        one per core). Faster than one image at a time on every core: small
        single-image runs do not keep several cores busy.

    Attributes
    ----------
    classes_ : ndarray or None
        Class labels in ``predict_proba``'s column order (None for a features file).
    kind : {"classifier", "features"}
    preprocessing : skltransfer.preprocessing.Preprocessing
        What the graph does to the pixels (read from the file).
    metadata : dict of str
        The file's ``skltransfer.*`` metadata.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> from skltransfer import PretrainedFeatures, export
    >>> images = np.random.default_rng(0).integers(0, 256, (6, 40, 50, 3), dtype=np.uint8)
    >>> clf = make_pipeline(PretrainedFeatures("test_efficientnet", weights=None, cache=None),
    ...                     LogisticRegression()).fit(images, ["cat", "dog"] * 3)
    >>> model = OnnxModel(export(clf, tempfile.mkdtemp() + "/model.onnx"))
    >>> model.classes_.tolist(), model.predict(images[:2]).tolist() == clf.predict(images[:2]).tolist()
    (['cat', 'dog'], True)
    """

    def __init__(self, path: str | os.PathLike, *, max_image_pixels: Any = _UNSET,
                 providers: Sequence[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("scoring an ONNX file needs onnxruntime: pip install onnxruntime") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such model file: {self.path}")
        self.threads = int(threads) if threads is not None else max(1, len(os.sched_getaffinity(0))
                                                                        if hasattr(os, "sched_getaffinity")
                                                                        else os.cpu_count() or 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # parallel over images instead (_run)
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(os.fspath(self.path), options,
                                                 providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:
            raise ValueError(f"{self.path}: not an ONNX model ONNX Runtime can load ({exc})") from None
        meta = self._session.get_modelmeta().custom_metadata_map
        self.metadata = {k: v for k, v in meta.items() if k.startswith("skltransfer.")}
        if "skltransfer.preprocessing" not in self.metadata:
            raise ValueError(f"{self.path}: not a file written by skltransfer.export (no skltransfer metadata)")
        self.kind = self.metadata["skltransfer.kind"]
        description = json.loads(self.metadata["skltransfer.preprocessing"])
        fields = {f for f in Preprocessing.__dataclass_fields__}
        self.preprocessing = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in description.items() if k in fields})
        classes = json.loads(self.metadata.get("skltransfer.classes", "null"))
        self.classes_ = None if classes is None else np.asarray(classes)
        if max_image_pixels is _UNSET:
            max_image_pixels = json.loads(self.metadata.get("skltransfer.max_image_pixels",
                                                            str(DEFAULT_MAX_IMAGE_PIXELS)))
        self.max_image_pixels = max_image_pixels
        self._outputs = [o.name for o in self._session.get_outputs()]

    def __repr__(self) -> str:
        return f"OnnxModel({os.fspath(self.path)!r})"

    # -- the estimators' answers ------------------------------------------------------------

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, ``(n_samples, n_classes)``, columns in ``classes_`` order."""
        return self._run(X, "probabilities")[1]

    def predict(self, X) -> np.ndarray:
        """The class of each image (the exported model's own ``predict``)."""
        labels, _ = self._run(X, "probabilities")
        return labels

    def transform(self, X) -> np.ndarray:
        """Feature rows (a file exported from ``PretrainedFeatures`` alone)."""
        if self.kind != "features":
            raise AttributeError(f"{self.path} is a classifier: use predict or predict_proba")
        return self._run(X, "features")[1]

    def from_logits(self, rows: np.ndarray, method: str) -> np.ndarray:
        """What ``method`` returns for the rows an :class:`~skltransfer.ImageLoadError` carries.

        Those rows are the probabilities (features for a features file) of the
        readable images, so that nothing is computed twice.
        """
        if method in ("predict_proba", "transform"):
            return rows
        if method == "predict":
            return self.classes_[rows.argmax(axis=1)]
        raise ValueError(f"method must be 'predict', 'predict_proba' or 'transform', got {method!r}")

    def _score_one(self, index: int, item) -> tuple[dict | None, ImageFailure | None]:
        try:
            pixels = decode_rgb_array(item, self.preprocessing.resized_size, max_pixels=self.max_image_pixels)
        except ImageLoadError as exc:
            return None, ImageFailure(index, describe_item(item), exc.failures[0].reason)
        return dict(zip(self._outputs, self._session.run(None, {"image": pixels[None]}))), None

    def _run(self, X, output: str) -> tuple[np.ndarray | None, np.ndarray]:
        if output == "probabilities" and self.kind != "classifier":
            raise AttributeError(f"{self.path} holds features, not a classifier: use transform")
        items = as_image_items(X)
        if len(items) == 0:
            raise ValueError("Found array with 0 sample(s) (shape=(0,)) while a minimum of 1 is required.")
        rows: np.ndarray | None = None
        labels: list[Any] = [None] * len(items)
        failures: list[ImageFailure] = []
        # Images in parallel, each decoded and run on one core: on 2 cores 1.5x one image at a time
        # on two (Pillow and ONNX Runtime release the GIL).
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            for index, (result, failure) in enumerate(pool.map(self._score_one, range(len(items)), items)):
                if failure is not None:
                    failures.append(failure)
                    continue
                row = result[output][0]
                if rows is None:
                    rows = np.zeros((len(items), row.shape[0]), dtype=np.float32)
                rows[index] = row
                if "label" in result:
                    labels[index] = result["label"][0]
        if rows is None:
            width = 0 if self.classes_ is None or output == "features" else len(self.classes_)
            rows = np.zeros((len(items), width), dtype=np.float32)
        if failures:
            raise ImageLoadError(failures, rows=rows)
        return np.asarray(labels) if output == "probabilities" else None, rows

