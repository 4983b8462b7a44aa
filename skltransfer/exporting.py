"""Exporting a fitted model to one ONNX file: decoded pixels in, label and probabilities out.

One job: write a fitted :class:`~sklearn.pipeline.Pipeline` that starts with
:class:`~skltransfer.PretrainedFeatures`, a fitted
:class:`~skltransfer.FineTuneClassifier` or a fitted ``PretrainedFeatures``
alone as one ONNX graph of three parts, joined with ``onnx.compose.merge_models``:

1. the preprocessing, built here node by node: the graph's input is
   ``image``, ``uint8`` RGB pixels shaped ``(N, H, W, 3)`` of any size (one
   image, or several of one size), and the graph resizes, crops or pads and
   normalises them exactly as :meth:`Preprocessing.resize_crop
   <skltransfer.preprocessing.Preprocessing.resize_crop>` and
   :meth:`~skltransfer.preprocessing.Preprocessing.normalize` do (the
   resize is torch's fixed-point arithmetic written in plain operators,
   so the pixels are the library's, bit for bit);
2. the network, exported by ``torch.onnx.export`` (the inference copy
   with BatchNorm folded, as the library runs it); for features computed
   with ``precision="int8"``, the int8 network quantised with the fitted
   calibration, as the library runs it (:mod:`~skltransfer.quantization`);
3. the head: the pipeline's scikit-learn steps converted by ``skl2onnx``
   (preferring plain ONNX operators over ``ai.onnx.ml`` ones where skl2onnx
   has both, so that OpenVINO reads the file too), or the fine-tuned
   classifier's softmax.

Outputs: ``label`` (the class, as ``classes_`` holds it) and
``probabilities`` (``(N, n_classes)``, ``classes_`` order); a features
file gives ``features``. The file's metadata (``skltransfer.*`` keys)
records the classes, the preprocessing and the input it takes, so that
:class:`skltransfer.serving.OnnxModel` and any other runtime can use it.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ExportError", "OPSET", "export"]

#: ONNX opset of every part (18 or later).
OPSET = 18
ML_OPSET = 3
INPUT = "image"

# skl2onnx operators that have a plain-ONNX equivalent it can emit instead (MatMul, Add,
# Softmax, ...): ONNX Runtime runs either; OpenVINO and other runtimes only the plain ones.
_ML_OPERATORS_WITH_PLAIN_FORM = {"LinearClassifier", "LinearRegressor", "Normalizer", "Scaler", "ZipMap"}


class ExportError(ValueError):
    """A model, or a step of it, that cannot be written as ONNX; the message names it and says why."""


def export(model: Any, path: str | os.PathLike, *, opset: int = OPSET) -> Path:
    """Write a fitted model as one ONNX file that scores decoded RGB pixels.

    Parameters
    ----------
    model : Pipeline, FineTuneClassifier or PretrainedFeatures
        Fitted. A pipeline starts with :class:`~skltransfer.PretrainedFeatures`
        (any feature options: ``layers``, ``pooling``, ``tta``, ``crop``) and
        continues with steps ``skl2onnx`` converts (scalers,
        ``LogisticRegression``, ``MLPClassifier``, ...).
    path : path
        Where to write the ``.onnx`` file (parents are created).
    opset : int, default=18
        The ONNX opset (18 or later).

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If the model (or its features step) is not fitted.
    ExportError
        Naming the part that does not convert and why: a step skl2onnx has
        no converter for, a module backbone the exporter cannot trace, a
        model of another kind.

    Examples
    --------
    >>> import numpy as np, onnxruntime, tempfile
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> from skltransfer import PretrainedFeatures, export
    >>> images = np.random.default_rng(0).integers(0, 256, (6, 40, 50, 3), dtype=np.uint8)
    >>> clf = make_pipeline(PretrainedFeatures("test_efficientnet", weights=None, cache=None),
    ...                     LogisticRegression()).fit(images, [0, 1] * 3)
    >>> path = export(clf, tempfile.mkdtemp() + "/model.onnx")
    >>> session = onnxruntime.InferenceSession(path)
    >>> label, probabilities = session.run(None, {"image": images[:2]})
    >>> bool(np.abs(probabilities - clf.predict_proba(images[:2])).max() < 1e-4)
    True
    """
    if opset < 18:
        raise ValueError(f"opset must be 18 or later, got {opset}")
    parts = _parts(model)
    network = _network_graph(parts["network"], parts["preprocessing"], parts["description"], opset)
    if parts["calibration"] is not None:  # the int8 network the library runs (skltransfer.quantization)
        from .quantization import quantize

        network = quantize(network, parts["calibration"])
    graph = _merge(_preprocessing_graph(parts["preprocessing"], opset), network, "input", "net/")
    if parts["head"] is not None:
        head = parts["head"](parts["width"], opset)
        graph = _merge(graph, head, "features", "head/")
    _rename_outputs(graph, parts["outputs"])
    _set_metadata(graph, parts["metadata"])
    _oldest_ir_version(graph)
    import onnx

    onnx.checker.check_model(graph)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, path)
    return path


# -- what the model is made of ----------------------------------------------------------


def _parts(model: Any) -> dict[str, Any]:
    from sklearn.pipeline import Pipeline
    from sklearn.utils.validation import check_is_fitted

    from .features import PretrainedFeatures
    from .finetune import FineTuneClassifier

    if isinstance(model, FineTuneClassifier):
        check_is_fitted(model)
        from .registry import inference_copy

        network = inference_copy(model.model_, "cpu", tta=model.tta_)
        classes = model.classes_
        return dict(network=network, preprocessing=model.preprocessing_, width=len(classes),
                    description=f"the fine-tuned {model.backbone!r}",
                    head=lambda width, opset: _softmax_head(classes, opset), calibration=None,
                    outputs=["label", "probabilities"],
                    metadata=_metadata(model, "classifier", model.preprocessing_, classes,
                                       backbone=model.backbone, max_image_pixels=model.max_image_pixels))
    if isinstance(model, PretrainedFeatures):
        return _features_parts(model, head=None, outputs=["features"], kind="features", classes=None, owner=model)
    if isinstance(model, Pipeline):
        first = model.steps[0][1]
        if not isinstance(first, PretrainedFeatures):
            raise ExportError(f"a pipeline exports when its first step is PretrainedFeatures; "
                              f"its first step is {type(first).__name__}")
        if len(model.steps) == 1:
            return _features_parts(first, head=None, outputs=["features"], kind="features", classes=None,
                                   owner=model)
        check_is_fitted(model)
        rest = model[1:]
        classes = getattr(rest, "classes_", None)
        if classes is None or not hasattr(rest, "predict_proba"):
            raise ExportError(f"the pipeline's last step, {type(model.steps[-1][1]).__name__}, is not a "
                              "classifier with predict_proba: the export gives labels and probabilities")
        return _features_parts(first, head=lambda width, opset: _sklearn_head(rest, width, opset),
                               outputs=["label", "probabilities"], kind="classifier", classes=classes,
                               owner=model)
    raise ExportError(f"cannot export a {type(model).__name__}: export takes a fitted Pipeline that starts with "
                      "PretrainedFeatures, a FineTuneClassifier or a PretrainedFeatures")


def _features_parts(features, *, head, outputs, kind, classes, owner) -> dict[str, Any]:
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(features)
    backbone = features._backbone("cpu")  # the torch model, its weights checked against fit's
    width = backbone.num_features
    calibration = getattr(features, "calibration_", None)
    metadata = _metadata(owner, kind, backbone.preprocessing, classes, backbone=backbone.name,
                         max_image_pixels=features.max_image_pixels, width=width,
                         precision="float32" if calibration is None else "int8")
    name = backbone.name if isinstance(features.backbone, str) else f"the module {backbone.name}"
    return dict(network=backbone.model, preprocessing=backbone.preprocessing, width=width,
                description=f"backbone {name!r}" if isinstance(features.backbone, str) else name,
                head=head, outputs=outputs, metadata=metadata, calibration=calibration)


def _metadata(model, kind: str, preprocessing, classes, **extra) -> dict[str, str]:
    from . import __version__

    height, width = preprocessing.input_size
    values = {
        "kind": kind,
        "version": __version__,
        "estimator": type(model).__name__,
        "input": (f"{INPUT}: uint8 RGB pixels, shape (N, H, W, 3), any H and W (N images of one size); "
                  f"resized, cropped and normalised inside the graph to (N, 3, {height}, {width})"),
        "preprocessing": json.dumps(preprocessing.as_dict()),
        "classes": json.dumps(None if classes is None else [_plain(c) for c in classes]),
        **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in extra.items()},
    }
    return {f"skltransfer.{key}": value for key, value in values.items()}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


# -- part 1: the preprocessing, node by node ----------------------------------------------


class _Nodes:
    """A small builder: constants and operators with generated names."""

    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, dtype=np.int64) -> str:
        from onnx import numpy_helper

        name = self._name("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attributes) -> str:
        from onnx import helper

        out = output or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attributes))
        return out

    # scalar arithmetic on 1-element tensors: int64 for sizes, float64 where Python divides
    def double(self, x):
        return self.op("Cast", x, to=11)  # DOUBLE

    def int64(self, x):
        return self.op("Cast", x, to=7)  # INT64

    def num(self, value: float) -> str:
        return self.const([value], np.float64)

    def int(self, value: int) -> str:
        return self.const([value], np.int64)

    def where(self, condition: str, a: str, b: str) -> str:
        return self.op("Where", condition, a, b)

    def floor_div2(self, x: str) -> str:  # x // 2 for x >= 0 (int64 division truncates)
        return self.op("Div", x, self.int(2))


def _preprocessing_graph(p, opset: int):
    """``image`` (uint8, N x H x W x 3) to ``input`` (float32, N x 3 x h x w), as ``Preprocessing`` does."""
    from onnx import TensorProto, helper

    if p.interpolation == "nearest":  # torch and ONNX round source indices differently
        raise ExportError("interpolation='nearest' does not export: ONNX's nearest resize picks other pixels")
    if p.crop_pct > 1 and p.crop in ("center", "auto") and p.crop_mode != "border":
        raise ExportError(f"crop_pct={p.crop_pct} > 1 pads inside the centre crop; the export does not write that")
    g = _Nodes()
    shape = g.op("Shape", INPUT)
    height = g.op("Slice", shape, g.int(1), g.int(2))
    width = g.op("Slice", shape, g.int(2), g.int(3))
    policies = {"none": _plan_none, "pad": _plan_pad, "center": _plan_center}
    if p.crop == "auto":
        small = g.op("And", g.op("Less", height, g.int(p.input_size[0])), g.op("Less", width, g.int(p.input_size[1])))
        none, center = _plan_none(g, p, height, width), _plan_center(g, p, height, width)
        plan = {key: g.where(small, none[key], center[key]) for key in none}
    else:
        plan = policies[p.crop](g, p, height, width)

    pixels = g.op("Transpose", INPUT, perm=[0, 3, 1, 2])
    axes = g.int(2), g.int(3)
    axes = g.op("Concat", *axes, axis=0)
    starts = g.op("Concat", plan["top"], plan["left"], axis=0)
    ends = g.op("Concat", g.op("Add", plan["top"], plan["keep_h"]), g.op("Add", plan["left"], plan["keep_w"]), axis=0)
    pixels = g.op("Slice", pixels, starts, ends, axes)
    pixels = _resize_as_torch(g, pixels, (plan["keep_h"], plan["resize_h"], plan["crop_top"], plan["crop_h"]),
                              (plan["keep_w"], plan["resize_w"], plan["crop_left"], plan["crop_w"]), p.interpolation)
    pixels = g.op("Cast", pixels, to=TensorProto.FLOAT)
    if "pad_top" in plan:  # letterbox with the mean colour: pad (pixels - colour) with zeros
        colour = g.const(np.array([round(m * 255) for m in p.mean], np.float32).reshape(1, 3, 1, 1), np.float32)
        bottom = g.op("Sub", g.op("Sub", g.int(p.input_size[0]), plan["crop_h"]), plan["pad_top"])
        right = g.op("Sub", g.op("Sub", g.int(p.input_size[1]), plan["crop_w"]), plan["pad_left"])
        zero = g.int(0)
        pads = g.op("Concat", zero, zero, plan["pad_top"], plan["pad_left"], zero, zero, bottom, right, axis=0)
        pixels = g.op("Add", g.op("Pad", g.op("Sub", pixels, colour), pads), colour)
    mean = g.const(np.array(p.mean, np.float32).reshape(1, 3, 1, 1), np.float32)
    std = g.const(np.array(p.std, np.float32).reshape(1, 3, 1, 1), np.float32)
    scaled = g.op("Div", pixels, g.const(np.float32(255.0), np.float32))
    g.op("Div", g.op("Sub", scaled, mean), std, output="input")
    height_out, width_out = p.input_size
    graph = helper.make_graph(
        g.nodes, "skltransfer_preprocessing",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, height_out, width_out])],
        initializer=g.initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# -- the resize, as torch computes it on uint8 pixels ----------------------------------------
#
# ONNX's Resize (antialias=1) is PIL's algorithm too, but ONNX Runtime rounds its fixed-point
# weights otherwise than torch, so 0.5-2 % of the pixels came out one grey level apart, which
# moved EfficientNet's features by up to 3 % and a probability by up to 0.03. So the graph does
# torch's own arithmetic (aten/src/ATen/native/cpu/UpSampleKernel.cpp, uint8 with antialias):
# per axis, PIL's filter weights in float64, normalised per output pixel, scaled to int16 with
# the most bits that keep the largest weight below 2**15, summed in int32 with half a unit
# added, shifted down and clamped to 0-255; first along the width, then along the height. Each
# output pixel gathers its few input pixels (its taps), and one batched u8 x u8 MatMulInteger
# sums them against the weights' bytes: exact in int32 on every CPU, and a runtime that reads
# plain ONNX operators (OpenVINO) computes the same pixels. (A dense product, every input pixel
# times a mostly-zero weight matrix, did the same sums with 20-200x the multiplications; int32
# Mul and ReduceSum over the gathered taps were slower than either, in ONNX Runtime's kernels.)


def _resize_as_torch(g: _Nodes, pixels: str, rows: tuple[str, str, str, str], columns: tuple[str, str, str, str],
                     interpolation: str) -> str:
    """(N, 3, H, W) uint8 resized and cropped, pixel for pixel as torch's antialiased resize and a crop.

    ``rows`` and ``columns`` are (input size, resized size, first kept, number kept):
    only the kept output pixels are computed (each depends on its own weights alone).
    Each pass works on a 2-D layout with the axis it resizes first, where gathering a
    tap copies a whole row (ONNX Runtime's Gather on an inner axis goes element by
    element), and every transpose swaps two axes or moves whole rows (the fast ones).
    """
    shape = g.op("Shape", pixels)
    n, height = g.op("Slice", shape, g.int(0), g.int(1)), g.op("Slice", shape, g.int(2), g.int(3))
    planes = g.op("Mul", n, g.int(3))
    flat = g.op("Reshape", pixels, g.op("Concat", g.int(-1), g.op("Slice", shape, g.int(3), g.int(4)), axis=0))
    by_column = g.op("Transpose", flat, perm=[1, 0])                                       # (W, N 3 H)
    wide = _resize_pass(g, by_column, *_fixed_point_weights(g, *columns, interpolation))   # (w, N 3 H)
    planes_rows = g.op("Reshape", g.op("Transpose", wide, perm=[1, 0]),                    # (N 3, H, w)
                       g.op("Concat", planes, height, g.int(-1), axis=0))
    by_row = g.op("Transpose", planes_rows, perm=[1, 0, 2])                                # (H, N 3, w)
    by_row = g.op("Reshape", by_row, g.op("Concat", height, g.int(-1), axis=0))           # (H, N 3 w)
    tall = _resize_pass(g, by_row, *_fixed_point_weights(g, *rows, interpolation))         # (h, N 3 w)
    out = g.op("Transpose", g.op("Reshape", tall, g.op("Concat", g.int(0), planes, g.int(-1), axis=0)),
               perm=[1, 0, 2])                                                             # (N 3, h, w)
    return g.op("Reshape", out, g.op("Concat", n, g.int(3), g.op("Shape", out, start=1), axis=0))


def _resize_pass(g: _Nodes, pixels: str, index: str, weights: str, unit: str) -> str:
    """The first axis of a 2-D (in, R) uint8 array resized: (kept, R).

    Each output pixel's K taps are gathered, (kept, K, R), and one batched u8 x u8
    MatMulInteger with the (kept, 3, K) rows of :func:`_fixed_point_weights`
    sums, per output pixel, its taps times the high bytes + 128, times the low
    bytes, and plain; the int16 weights' sum is then ``256 (high - 128 plain) + low``,
    exact in int32.
    """
    from onnx import TensorProto

    taps = g.op("Gather", pixels, index, axis=0)                                        # (kept, K, R)
    sums = g.op("MatMulInteger", weights, taps)                                         # (kept, 3, R) int32
    high, low, plain = (g.op("Squeeze", g.op("Slice", sums, g.int(row), g.int(row + 1), g.int(1)), g.int(1))
                        for row in range(3))
    high = g.op("Sub", high, g.op("Mul", plain, g.const(128, np.int32)))
    total = g.op("Add", g.op("Mul", high, g.const(256, np.int32)), low)
    total = g.op("Add", total, g.op("Div", unit, g.const(2, np.int32)))    # + 2**(p - 1), then >> p
    shifted = g.op("Div", total, unit)   # truncates; a negative sum clamps to 0 either way
    return g.op("Cast", g.op("Clip", shifted, g.const(0, np.int32), g.const(255, np.int32)), to=TensorProto.UINT8)


def _fixed_point_weights(g: _Nodes, size_in: str, size_out: str, start: str, kept: str,
                         interpolation: str) -> tuple[str, str, str]:
    """torch's int16 weights of the kept outputs, with the input pixel each one multiplies.

    Returns the input indices (kept, K) int64, K the most taps an output
    pixel has (a tap past the image has weight 0 and the last pixel's index);
    the weights as (kept, 3, K) uint8 rows: the high bytes + 128 (-128..127
    stored as 0..255), the low bytes (0..255) and ones, for one u8 x u8
    MatMulInteger (:func:`_resize_pass`); and 2**p (int32). Not u8 x s8: on
    x86 CPUs without VNNI (AVX2 only: AMD Zen 3, Intel before Ice Lake)
    ONNX Runtime runs that with VPMADDUBSW, whose 16-bit pair sums saturate.
    """
    from onnx import TensorProto

    taps = {"bilinear": 2, "bicubic": 4}[interpolation]
    n_in, n_out = g.double(size_in), g.double(size_out)
    scale = g.op("Div", n_in, n_out)
    shrinking = g.op("GreaterOrEqual", scale, g.num(1.0))
    support = g.where(shrinking, g.op("Mul", g.num(taps * 0.5), scale), g.num(taps * 0.5))
    inverse = g.where(shrinking, g.op("Div", g.num(1.0), scale), g.num(1.0))
    most = g.op("Add", g.op("Mul", g.op("Ceil", support), g.num(2.0)), g.num(1.0))   # taps per output pixel

    def count(n):  # 0, 1, ..., n - 1 as float64
        return g.double(g.op("Range", g.const(0), g.op("Squeeze", n, g.int(0)), g.const(1)))

    center = g.op("Mul", scale, g.op("Add", count(size_out), g.num(0.5)))              # (out,)
    first = g.op("Max", g.op("Floor", g.op("Add", g.op("Sub", center, support), g.num(0.5))), g.num(0.0))
    end = g.op("Min", g.op("Floor", g.op("Add", g.op("Add", center, support), g.num(0.5))), n_in)
    used = g.op("Min", g.op("Max", g.op("Sub", end, first), g.num(0.0)), most)
    tap = g.op("Unsqueeze", count(g.int64(most)), g.int(1))                                # (K, 1)
    column = g.op("Add", tap, first)                                                       # (K, out)
    x = g.op("Mul", g.op("Add", g.op("Sub", column, center), g.num(0.5)), inverse)
    weights = g.where(g.op("Less", tap, used), _filter(g, x, interpolation), g.num(0.0))
    weights = g.op("Div", weights, g.op("ReduceSum", weights, g.int(0), keepdims=1))
    largest = g.op("ReduceMax", weights, keepdims=0)   # over every output pixel, kept or not, as torch
    # the precision p: the number of p in 0..21 with round(largest * 2**(p + 1)) < 2**15
    fits = g.op("Less", g.op("Floor", g.op("Add", g.op("Mul", largest, g.const(2.0 ** np.arange(1, 23), np.float64)),
                                                g.num(0.5))), g.num(2.0 ** 15))
    unit = g.op("Pow", g.num(2.0), g.op("ReduceSum", g.op("Cast", fits, to=TensorProto.DOUBLE), keepdims=0))
    stop = g.op("Add", start, kept)
    weights = g.op("Slice", weights, start, stop, g.int(1))
    column = g.op("Slice", column, start, stop, g.int(1))
    rounded = g.op("Mul", g.op("Sign", weights),   # round half away from zero, as C's (int)(v +- 0.5)
                   g.op("Floor", g.op("Add", g.op("Mul", g.op("Abs", weights), unit), g.num(0.5))))
    index = g.int64(g.op("Min", column, g.op("Sub", n_in, g.num(1.0))))
    low = g.op("Sub", rounded, g.op("Mul", g.op("Floor", g.op("Div", rounded, g.num(256.0))), g.num(256.0)))
    high = g.op("Div", g.op("Sub", rounded, low), g.num(256.0))                           # -128..127
    rows = g.op("Concat", *(g.op("Unsqueeze", r, g.int(0)) for r in (
        g.op("Add", high, g.num(128.0)), low, g.op("Add", g.op("Mul", low, g.num(0.0)), g.num(1.0)))), axis=0)
    weights = g.op("Transpose", g.op("Cast", rows, to=TensorProto.UINT8), perm=[2, 0, 1])  # (kept, 3, K)
    return g.op("Transpose", index, perm=[1, 0]), weights, g.op("Cast", unit, to=TensorProto.INT32)


def _filter(g: _Nodes, x: str, interpolation: str) -> str:
    """PIL's filters, as torch has them: the triangle, and the cubic with a = -0.5."""
    distance, one = g.op("Abs", x), g.num(1.0)
    if interpolation == "bilinear":
        return g.op("Max", g.op("Sub", one, distance), g.num(0.0))
    a = -0.5  # ((a + 2) x - (a + 3)) x x + 1 below 1; (((x - 5) x + 8) x - 4) a below 2
    near = g.op("Add", g.op("Mul", g.op("Mul", g.op("Sub", g.op("Mul", g.num(a + 2), distance), g.num(a + 3)),
                                        distance), distance), one)
    far = g.op("Mul", g.op("Sub", g.op("Mul", g.op("Add", g.op("Mul", g.op("Sub", distance, g.num(5.0)), distance),
                                                   g.num(8.0)), distance), g.num(4.0)), g.num(a))
    return g.where(g.op("Less", distance, one), near, g.where(g.op("Less", distance, g.num(2.0)), far, g.num(0.0)))


def _plan_none(g: _Nodes, p, height: str, width: str) -> dict[str, str]:
    ih, iw = g.int(p.input_size[0]), g.int(p.input_size[1])
    zero = g.int(0)
    plan = dict(top=zero, left=zero, keep_h=height, keep_w=width, resize_h=ih, resize_w=iw,
                crop_top=zero, crop_left=zero, crop_h=ih, crop_w=iw)
    if _pads(p):
        plan.update(pad_top=zero, pad_left=zero)
    return plan


def _pads(p) -> bool:
    return p.crop == "pad" or (p.crop in ("center", "auto") and p.crop_mode == "border")


def _round_at_least_one(g: _Nodes, x: str) -> str:  # max(1, round(x)), Python's round: half to even
    return g.op("Max", g.int64(g.op("Round", x)), g.int(1))


def _plan_pad(g: _Nodes, p, height: str, width: str) -> dict[str, str]:
    h, w = g.double(height), g.double(width)
    ratio = g.op("Min", g.op("Div", g.num(p.input_size[0]), h), g.op("Div", g.num(p.input_size[1]), w))
    rh = _round_at_least_one(g, g.op("Mul", h, ratio))
    rw = _round_at_least_one(g, g.op("Mul", w, ratio))
    zero = g.int(0)
    return dict(top=zero, left=zero, keep_h=height, keep_w=width, resize_h=rh, resize_w=rw,
                crop_top=zero, crop_left=zero, crop_h=rh, crop_w=rw,
                pad_top=g.floor_div2(g.op("Sub", g.int(p.input_size[0]), rh)),
                pad_left=g.floor_div2(g.op("Sub", g.int(p.input_size[1]), rw)))


def _plan_center(g: _Nodes, p, height: str, width: str) -> dict[str, str]:
    from .preprocessing import MAX_STRETCH

    scale_h, scale_w = p.scale_size
    crop_h, crop_w = p.input_size
    h, w = g.double(height), g.double(width)
    if p.crop_mode == "squash":
        rh, rw = g.int(scale_h), g.int(scale_w)
    elif p.crop_mode == "border" or scale_h != scale_w:  # timm's ResizeKeepRatio
        ratio_h, ratio_w = g.op("Div", h, g.num(scale_h)), g.op("Div", w, g.num(scale_w))
        ratio = g.op("Max" if p.crop_mode == "border" else "Min", ratio_h, ratio_w)
        rh = _round_at_least_one(g, g.op("Div", h, ratio))
        rw = _round_at_least_one(g, g.op("Div", w, ratio))
    else:  # the short side to scale_h: int(scale_h * long / short)
        short, long = g.op("Min", h, w), g.op("Max", h, w)
        longer = g.int64(g.op("Floor", g.op("Div", g.op("Mul", g.num(scale_h), long), short)))
        portrait = g.op("LessOrEqual", height, width)
        rh = g.where(portrait, g.int(scale_h), longer)
        rw = g.where(portrait, longer, g.int(scale_h))
    # Preprocessing._keep_what_the_crop_keeps: past MAX_STRETCH times the crop, resize only the middle
    top, keep_h, rh = _keep_middle(g, height, h, rh, crop_h, MAX_STRETCH)
    left, keep_w, rw = _keep_middle(g, width, w, rw, crop_w, MAX_STRETCH)
    plan = dict(top=top, left=left, keep_h=keep_h, keep_w=keep_w, resize_h=rh, resize_w=rw)
    if p.crop_mode == "border":  # centre crop to at most the input size, then letterbox
        ch, cw = g.op("Min", rh, g.int(crop_h)), g.op("Min", rw, g.int(crop_w))
        plan.update(pad_top=g.floor_div2(g.op("Sub", g.int(crop_h), ch)),
                    pad_left=g.floor_div2(g.op("Sub", g.int(crop_w), cw)))
    else:
        ch, cw = g.int(crop_h), g.int(crop_w)
        if _pads(p):
            plan.update(pad_top=g.int(0), pad_left=g.int(0))
    # torchvision's centre crop: int(round((size - crop) / 2.0))
    plan.update(crop_top=_half_rounded(g, g.op("Sub", rh, ch)), crop_left=_half_rounded(g, g.op("Sub", rw, cw)),
                crop_h=ch, crop_w=cw)
    return plan


def _half_rounded(g: _Nodes, x: str) -> str:
    return g.int64(g.op("Round", g.op("Div", g.double(x), g.num(2.0))))


def _keep_middle(g: _Nodes, size: str, size_d: str, out: str, crop: int, stretch: int):
    too_long = g.op("Greater", out, g.int(stretch * crop))
    keep = g.op("Max", g.int(1), g.int64(g.op("Ceil", g.op("Div", g.op("Mul", g.num(2 * crop), size_d),
                                                               g.double(out)))))
    keep = g.where(too_long, keep, size)
    start = g.where(too_long, g.floor_div2(g.op("Sub", size, keep)), g.int(0))
    return start, keep, g.where(too_long, g.int(2 * crop), out)


# -- part 2: the network ------------------------------------------------------------------


def _network_graph(network, preprocessing, description: str, opset: int):
    import torch

    height, width = preprocessing.input_size
    example = torch.zeros(2, 3, height, width)
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(network.eval(), (example,), dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=["features"],
                                        dynamic_shapes=({0: batch},), verbose=False)
        model = program.model_proto
    except Exception as exc:
        raise ExportError(f"{description} does not export to ONNX: {_first_line(exc)}") from exc
    _check_network(model, network, example, description)
    return model


def _check_network(model, network, example, description: str) -> None:
    """The exported network computes what the module does, on a random batch of three; else ExportError.

    A module whose forward leaves torch (numpy, Python on tensor values) can
    export without an error and compute something else: that must not reach a file.
    """
    import onnxruntime as ort
    import torch

    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(3, *example.shape[1:], generator=generator)
    with torch.inference_mode():
        expected = network(batch).float().numpy()
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    except Exception as exc:
        raise ExportError(f"{description} exports to ONNX, but ONNX Runtime cannot run it: "
                          f"{_first_line(exc)}") from exc
    scale = max(1.0, float(np.abs(expected).max()))
    if not difference <= 1e-3 * scale:
        raise ExportError(f"{description} exports to ONNX but computes something else (largest difference "
                          f"{difference:.3g} on a random batch): its forward likely leaves torch")


class _quiet:
    """Silence torch.export's progress lines on stdout."""

    def __enter__(self):
        import contextlib

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        return self._redirect.__enter__()

    def __exit__(self, *exc):
        return self._redirect.__exit__(*exc)


def _first_line(exc: BaseException) -> str:
    """The first line of the innermost cause (the exporter wraps the reason in steps), colours off."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: " + (text[0] if text else "no message")[:300]


# -- part 3: the head -----------------------------------------------------------------------


def _sklearn_head(steps, width: int, opset: int):
    try:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError:
        raise ImportError("exporting a pipeline's scikit-learn steps needs skl2onnx: "
                          'pip install "skltransfer[export]"') from None
    inputs = [("features", FloatTensorType([None, width]))]
    options = {id(steps.steps[-1][1]): {"zipmap": False}}
    target = {"": opset, "ai.onnx.ml": ML_OPSET}
    try:
        try:
            head = to_onnx(steps, initial_types=inputs, options=options, target_opset=target,
                           black_op=_ML_OPERATORS_WITH_PLAIN_FORM)
        except RuntimeError as exc:  # no plain form for one of the steps: ai.onnx.ml it is
            if "black listed" not in str(exc):
                raise
            head = to_onnx(steps, initial_types=inputs, options=options, target_opset=target)
    except Exception as exc:
        raise ExportError(f"skl2onnx cannot convert the step {_step_name(steps, exc)}: "
                          f"{_first_line(exc)}") from exc
    _plain_label_lookup(head)
    return head


def _step_name(steps, exc: Exception) -> str:
    """The first step skl2onnx has no converter for (named in its message), else the last one."""
    message = str(exc)
    for name, step in steps.steps:
        if type(step).__name__ in message:
            return f"{name!r} ({type(step).__name__})"
    name, step = steps.steps[-1]
    return f"{name!r} ({type(step).__name__})"


def _plain_label_lookup(model) -> None:
    """``ArrayFeatureExtractor(classes, index)`` on a constant 1-D ``classes`` is ``Gather(axis=0)``.

    skl2onnx looks labels up with the ``ai.onnx.ml`` operator; the plain one
    computes the same (the ``Reshape`` that follows flattens either shape) and
    every ONNX runtime has it.
    """
    from onnx import helper

    constants = {init.name: len(init.dims) for init in model.graph.initializer}
    for i, node in enumerate(model.graph.node):
        if node.op_type == "ArrayFeatureExtractor" and constants.get(node.input[0]) == 1:
            model.graph.node[i].CopyFrom(helper.make_node("Gather", list(node.input), list(node.output),
                                                          name=node.name, axis=0))
    used = {node.domain for node in model.graph.node}
    if "ai.onnx.ml" not in used:
        kept = [o for o in model.opset_import if o.domain != "ai.onnx.ml"]
        del model.opset_import[:]
        model.opset_import.extend(kept)


def _softmax_head(classes, opset: int):
    from onnx import TensorProto, helper

    g = _Nodes()
    names = np.asarray([_plain(c) for c in classes])
    if names.dtype.kind in "US":
        table = g.const(names.astype(object), object)
        label_type = TensorProto.STRING
    else:
        table = g.const(names.astype(np.int64), np.int64)
        label_type = TensorProto.INT64
    g.op("Softmax", "features", axis=1, output="probabilities")
    g.op("Gather", table, g.op("ArgMax", "features", axis=1, keepdims=0), axis=0, output="label")
    graph = helper.make_graph(
        g.nodes, "skltransfer_softmax",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", len(classes)])],
        [helper.make_tensor_value_info("label", label_type, ["N"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(classes)])],
        initializer=g.initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# -- joining the parts ------------------------------------------------------------------------


def _merge(first, second, name: str, prefix: str):
    """``second`` fed by ``first``'s output ``name`` (its input of the same name), as one model."""
    from onnx import compose, helper

    version = max(first.ir_version, second.ir_version)
    first.ir_version = second.ir_version = version
    opsets = {}
    for model in (first, second):
        for entry in model.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    for model in (first, second):
        del model.opset_import[:]
        model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    source = next(o.name for o in first.graph.output if o.name == name or o.name.endswith("/" + name))
    target = second.graph.input[0].name
    merged = compose.merge_models(first, second, io_map=[(source, target)], prefix2=prefix)
    return merged


def _oldest_ir_version(model) -> None:
    """One entry per opset domain, and the oldest IR version that has them (8 for opset 18).

    The onnx package writes its own newest IR version, which ONNX Runtimes older
    than that package refuse to load ("Unsupported model IR version"); nothing in
    the file needs more than its opsets do.
    """
    from onnx import helper

    opsets = {}
    for entry in model.opset_import:
        opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets.items())
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)


def _rename_outputs(model, names: list[str]) -> None:
    """The graph's outputs under their public names (``label``, ``probabilities``, ``features``)."""
    renames = {}
    for output, name in zip(model.graph.output, names):
        renames[output.name] = name
        output.name = name
    for node in model.graph.node:
        for i, out in enumerate(node.output):
            if out in renames:
                node.output[i] = renames[out]
        for i, inp in enumerate(node.input):
            if inp in renames:
                node.input[i] = renames[inp]


def _set_metadata(model, metadata: dict[str, str]) -> None:
    from onnx import helper

    helper.set_model_props(model, metadata)
    model.producer_name = "skltransfer"
    model.producer_version = metadata.get("skltransfer.version", "")
    model.doc_string = metadata["skltransfer.input"]
