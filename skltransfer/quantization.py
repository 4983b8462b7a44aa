"""int8: a network calibrated on sample images, quantised, and run by ONNX Runtime on the CPU.

One job: turn a float feature model (an eval-mode ``nn.Module`` from
:mod:`~skltransfer.backbones`) into an int8 network, and run it on ``uint8``
image batches. The quantisation is ONNX Runtime's static quantisation
(``onnxruntime.quantization.quantize_static``), not written here:

1. the network is exported to ONNX exactly as :func:`skltransfer.export`
   writes it (``torch.onnx.export``, BatchNorm folded);
2. :func:`calibrate` runs it over sample images and records, for every
   tensor the quantiser touches, the smallest and largest value seen
   (min-max calibration): a :class:`Calibration`, a few kilobytes that a
   fitted estimator keeps and a model file carries;
3. :func:`quantize` rebuilds the int8 network from the float one and a
   calibration alone, with no image: QDQ format, ``uint8`` activations,
   per-channel ``int8`` weights, as ONNX Runtime recommends for x86 CPUs.
   So a fitted model scores in int8 on any machine, and the exported file
   holds the same network.

Weights use all 8 bits on CPUs with VNNI or AMX (Intel Ice Lake and later,
AMD Zen 4 and later). On CPUs without them ONNX Runtime's int8 kernels sum
pairs of products in 16 bits, which can saturate: there the weights are
quantised to 7 bits (``reduce_range``), as ONNX Runtime advises. The two
give slightly different numbers, so the choice is part of the feature
cache's key.

Why ONNX Runtime runs the int8 network, not OpenVINO: OpenVINO 2026.4 reads
the QDQ file but computes other numbers from it (features at cosine 0.69 to
the float network's where ONNX Runtime's are at 0.994, on EfficientNet-Lite0
and 82 hymenoptera photos), from the first quantised convolution on.
OpenVINO's own quantiser (NNCF) would need its own calibration, so the
library's int8 rows and the exported file would come from two different
networks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .engines import save_atomically
from .preprocessing import Preprocessing

__all__ = [
    "CALIBRATION_IMAGES",
    "Calibration",
    "Int8Model",
    "calibrate",
    "calibrate_backbone",
    "calibration_batches",
    "calibration_sample",
    "check_int8_available",
    "compile_int8",
    "float_network",
    "full_range_int8",
    "network_onnx",
    "quantize",
]

#: Images a calibration runs over, at most (drawn reproducibly from the training images).
CALIBRATION_IMAGES = 300
_METHOD = "minmax"
#: Calibration batches: ONNX Runtime keeps every intermediate output of a batch at once.
_CALIBRATION_BATCH = 10


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The activation ranges an int8 network is quantised with.

    Attributes
    ----------
    tensors : tuple of str
        The network's tensors, by their names in its ONNX export.
    ranges : tuple of (float, float)
        The smallest and largest value of each tensor over the calibration images.
    images : int
        How many images were seen.
    method : str
        ``"minmax"``.
    """

    tensors: tuple
    ranges: tuple
    images: int
    method: str = _METHOD

    @property
    def digest(self) -> str:
        """A fingerprint of the ranges (part of cache keys)."""
        text = json.dumps([self.method, list(self.tensors), [list(r) for r in self.ranges]])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _tensors_data(self) -> dict:
        """The ranges as ONNX Runtime's calibration cache file holds them."""
        def array(value: float) -> dict:
            return {"CLS": "numpy.array", "data": float(value), "dtype": "float32"}

        return {
            "CLS": "TensorsData",
            "calibration_method": {"CLS": "CalibrationMethod", "value": "CalibrationMethod.MinMax"},
            "data": {name: {"CLS": "TensorData", "lowest": array(low), "highest": array(high)}
                     for name, (low, high) in zip(self.tensors, self.ranges)},
            "smooth_quant": False,
        }


def check_int8_available() -> None:
    """Raise an ImportError saying what to install when int8 cannot run here."""
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx.export's exporter)
    except ImportError as exc:
        raise ImportError(
            f"precision='int8' quantises the network with ONNX Runtime, which is not installed here "
            f"({exc}). Install the export extra from your clone: pip install -e \".[export]\"") from None
    import inspect

    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime

        raise ImportError(
            f"precision='int8' rebuilds the int8 network from stored ranges, which ONNX Runtime "
            f"{onnxruntime.__version__} cannot do: pip install --upgrade onnxruntime")


@functools.lru_cache(maxsize=1)
def full_range_int8() -> bool:
    """Whether this CPU sums 8-bit products without saturating (VNNI or AMX; any non-x86 CPU).

    Where it does not (x86 with AVX2 alone), weights are quantised to 7 bits.
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    except OSError:
        pass
    return False


def calibration_sample(n_items: int, size: int = CALIBRATION_IMAGES) -> list[int]:
    """Positions of the images a calibration runs over: all, or ``size`` drawn with a fixed seed.

    Examples
    --------
    >>> calibration_sample(5)
    [0, 1, 2, 3, 4]
    >>> calibration_sample(1000, 3) == calibration_sample(1000, 3)
    True
    """
    if n_items <= size:
        return list(range(n_items))
    return sorted(np.random.default_rng(0).choice(n_items, size, replace=False).tolist())


def network_onnx(model: nn.Module, preprocessing: Preprocessing, description: str):
    """The float network as ONNX, as :func:`skltransfer.export` writes it (input ``input``, output ``features``)."""
    from .exporting import OPSET, _network_graph

    return _network_graph(model, preprocessing, description, OPSET)


def calibrate(network, batches: Iterable[np.ndarray]) -> Calibration:
    """Min-max ranges of the network's tensors over normalised float batches.

    Parameters
    ----------
    network : onnx.ModelProto
        The float network (:func:`network_onnx`).
    batches : iterable of ndarray
        Normalised ``float32 (N, 3, H, W)`` batches.

    Returns
    -------
    Calibration
    """
    from onnxruntime.quantization import CalibrationDataReader

    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("no calibration image could be read")
    batches = itertools.chain([first], batches)
    seen = [0]

    class Reader(CalibrationDataReader):
        def get_next(self):
            batch = next(batches, None)
            if batch is None:
                return None
            seen[0] += len(batch)
            return {"input": np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="skltransfer-int8-") as work:
        ranges = Path(work) / "ranges.json"
        _quantize_static(network, Path(work) / "int8.onnx", Reader(), ranges)
        data = json.loads(ranges.read_text())["data"]
    names = tuple(sorted(data))
    return Calibration(
        tensors=names,
        ranges=tuple((_number(data[n]["lowest"]), _number(data[n]["highest"])) for n in names),
        images=seen[0],
    )


def quantize(network, calibration: Calibration, *, full_range: bool | None = None):
    """The int8 network from the float one and a calibration (no image needed).

    Parameters
    ----------
    network : onnx.ModelProto
        The float network (:func:`network_onnx`).
    calibration : Calibration
    full_range : bool, optional
        8-bit weights (True) or 7-bit (False); default: :func:`full_range_int8`.

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    ValueError
        If the calibration names tensors the network does not have (it was
        made with another export of the network: another torch version, say).
    """
    import onnx

    present = {name for node in network.graph.node for name in (*node.input, *node.output)}
    present |= {value.name for value in network.graph.input}
    missing = [name for name in calibration.tensors if name not in present]
    if missing:
        raise ValueError(
            f"the int8 calibration names {len(missing)} tensors this export of the network does not have "
            f"(such as {missing[0]!r}): it was made with another version of torch or of the network's code. "
            "Refit the model here to calibrate it again.")
    full_range = full_range_int8() if full_range is None else full_range
    with tempfile.TemporaryDirectory(prefix="skltransfer-int8-") as work:
        ranges = Path(work) / "ranges.json"
        ranges.write_text(json.dumps(calibration._tensors_data()))
        out = Path(work) / "int8.onnx"
        _quantize_static(network, out, None, ranges, reduce_range=not full_range)
        return onnx.load(out)


def _quantize_static(network, out: Path, reader, ranges: Path, *, reduce_range: bool = False) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # From a file: given a ModelProto, quantize_static moves its weights out to external data in place.
    source = out.with_name("float.onnx")
    onnx.save(network, source)
    with _quiet_quantizer():
        quantize_static(
            source, out, reader,
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=ranges,
        )


@contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantiser logs advice on the root logger at every call; nothing a user acts on."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(before)


def _number(value: Any) -> float:
    if isinstance(value, dict):  # {"CLS": "numpy.array", "data": ..., "dtype": ...}
        value = value["data"]
    return float(np.asarray(value, dtype=np.float32).reshape(-1)[0])


class Int8Model:
    """An int8 network run by ONNX Runtime: ``uint8 (N, 3, H, W)`` batch in, float32 rows out.

    The batch is normalised as :meth:`Preprocessing.normalize
    <skltransfer.preprocessing.Preprocessing.normalize>` does, then run.
    :meth:`start` returns at once (ONNX Runtime computes outside the GIL, on
    its own threads), so the caller can decode the next batch meanwhile.

    Parameters
    ----------
    network : bytes
        The quantised ONNX network (:func:`quantize`).
    preprocessing : Preprocessing
        Its normalisation.
    threads : int, optional
        ONNX Runtime's threads; default: the cores this process may use.
    """

    def __init__(self, network: bytes, preprocessing: Preprocessing, threads: int | None = None):
        import onnxruntime as ort

        from .runtime import available_cores

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(network, options, providers=["CPUExecutionProvider"])
        self.preprocessing = preprocessing
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="skltransfer-int8")

    def start(self, batch: torch.Tensor | np.ndarray) -> concurrent.futures.Future:
        """Start computing a batch; ``.result()`` of the returned handle gives its rows."""
        batch = torch.as_tensor(batch)
        pixels = self.preprocessing.normalize(batch).numpy()
        return self._pool.submit(self._run, pixels)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {"input": pixels})[0], dtype=np.float32)

    def __call__(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.start(batch).result()


def compile_int8(
    model: nn.Module,
    preprocessing: Preprocessing,
    calibration: Calibration,
    *,
    description: str = "the network",
    identity: dict[str, Any] | None = None,
    directory: str | os.PathLike | None = None,
) -> Int8Model:
    """The int8 network for a float model and a calibration, ready to run (read from disk when kept there).

    Parameters
    ----------
    model : torch.nn.Module
        Eval-mode float model taking a normalised ``(N, 3, H, W)`` batch.
    preprocessing : Preprocessing
    calibration : Calibration
    description : str
        How errors name the model.
    identity : dict, optional
        Everything that determines the float model's computation. With
        ``directory``, the int8 network is kept there under a digest of it,
        the calibration, the weight width and the library versions, and read
        back next time without exporting or quantising again.
    directory : path, optional
        Where int8 networks are kept (``<feature cache>/engines``).

    Returns
    -------
    Int8Model

    Examples
    --------
    >>> from skltransfer.backbones import load_backbone
    >>> b = load_backbone("test_efficientnet", weights=None)
    >>> network = network_onnx(b.model, b.preprocessing, "test")
    >>> images = torch.randint(0, 256, (4, 3, 160, 160), dtype=torch.uint8)
    >>> calibration = calibrate(network, [b.preprocessing.normalize(images).numpy()])
    >>> int8 = compile_int8(b.model, b.preprocessing, calibration)
    >>> int8(images).shape
    (4, 256)
    """
    check_int8_available()
    full_range = full_range_int8()
    digest = None if identity is None else _int8_digest(identity, calibration, full_range)
    saved = None if digest is None or directory is None else Path(directory) / digest / "model.onnx"
    with _file_lock(saved) if saved is not None else nullcontext():
        with _NETWORKS_LOCK:
            network = _NETWORKS.get(digest) if digest is not None else None
        if network is None and saved is not None and saved.is_file():
            network = saved.read_bytes()
        if network is None:
            source = float_network(model, preprocessing, description, identity)
            network = quantize(source, calibration, full_range=full_range).SerializeToString()
            if saved is not None:
                save_atomically(saved, functools.partial(Path.write_bytes, data=network))
    if digest is not None:
        with _NETWORKS_LOCK:
            _NETWORKS[digest] = network
            while len(_NETWORKS) > _KEPT:
                _NETWORKS.popitem(last=False)
    return Int8Model(network, preprocessing)


def float_network(model: nn.Module, preprocessing: Preprocessing, description: str,
                  identity: dict[str, Any] | None = None):
    """:func:`network_onnx`, kept in memory per ``identity``: calibrating, then quantising, export once."""
    key = None if identity is None else json.dumps(identity, sort_keys=True, default=str)
    with _NETWORKS_LOCK:
        if key is not None and key in _FLOAT:
            _FLOAT.move_to_end(key)
            return _FLOAT[key]
    network = network_onnx(model, preprocessing, description)
    if key is not None:
        with _NETWORKS_LOCK:
            _FLOAT[key] = network
            while len(_FLOAT) > _KEPT:
                _FLOAT.popitem(last=False)
    return network


# digest -> int8 network bytes; identity -> float ONNX network: each made once per process.
_NETWORKS: collections.OrderedDict[str, bytes] = collections.OrderedDict()
_FLOAT: collections.OrderedDict[str, Any] = collections.OrderedDict()
_NETWORKS_LOCK = threading.Lock()
_KEPT = 4


def _int8_digest(identity: dict[str, Any], calibration: Calibration, full_range: bool) -> str:
    import onnxruntime
    import timm

    versions = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "timm": timm.__version__,
                "format": 1}
    text = json.dumps({"model": identity, "calibration": calibration.digest, "full_range": full_range,
                       "versions": versions}, sort_keys=True, default=str)
    return "int8-" + hashlib.sha256(text.encode()).hexdigest()[:32]


@contextmanager
def _file_lock(saved: Path):
    from .cache import file_lock

    with file_lock(saved.parent.with_suffix(".lock")):
        yield


def calibration_batches(items: Sequence[Any], preprocessing: Preprocessing, *, batch_size: int = _CALIBRATION_BATCH,
                        max_image_pixels: int | None = None) -> Iterable[np.ndarray]:
    """Normalised float batches of the images at :func:`calibration_sample`'s positions; unreadable ones skipped."""
    from .inference import image_batches

    chosen = [items[i] for i in calibration_sample(len(items))]
    loader = image_batches(chosen, preprocessing.resize_crop, batch_size=batch_size,
                           min_size=preprocessing.resized_size, max_image_pixels=max_image_pixels)
    for _, batch, _ in loader:
        if batch is not None:
            yield preprocessing.normalize(batch).numpy()


def calibrate_backbone(backbone, identity: dict[str, Any], items: Sequence[Any], *,
                       max_image_pixels: int | None = None) -> Calibration:
    """The :class:`Calibration` of a registry backbone (float, on the CPU) over sample images of ``items``.

    Parameters
    ----------
    backbone : Backbone
        Its ``model`` (float, eval mode) and the ``preprocessing`` the images get.
    identity : dict
        What determines the model's computation
        (:func:`skltransfer.registry.model_identity`): the float network is
        exported once per process for it.
    items : sequence of image items
        The training images; :func:`calibration_sample` picks the ones used.
    max_image_pixels : int or None
        As in decoding: larger images are skipped.

    Raises
    ------
    ValueError
        If none of the sampled images can be read.
    """
    check_int8_available()
    network = float_network(backbone.model, backbone.preprocessing, f"backbone {backbone.name!r}", identity)
    try:
        return calibrate(network, calibration_batches(items, backbone.preprocessing,
                                                      max_image_pixels=max_image_pixels))
    except ValueError as exc:
        if "no calibration image" not in str(exc):
            raise
        raise ValueError(f"precision='int8' calibrates on the training images, but none of the "
                         f"{len(calibration_sample(len(items)))} sampled could be read") from None
