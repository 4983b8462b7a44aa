"""Inference engines: which runtime executes a feature model on the CPU.

One job: turn a feature model (an eval-mode ``nn.Module`` from
:mod:`~skltransfer.backbones`) into something that maps a ``uint8`` image
batch to feature rows as fast as this machine allows, and say which runtime
that is. Batching and decoding stay in :mod:`~skltransfer.inference`.

* ``"torch"``: eager PyTorch, on CPU or CUDA (autocast for 16-bit).
* ``"openvino"``: the model converted once by OpenVINO (``openvino.convert_model``)
  and compiled for this CPU. On 2 cores EfficientNet-Lite0 runs about 1.8x
  faster than eager torch in float32, at features within 2e-7 (relative) of
  torch's; normalisation runs inside the compiled model. The converted
  model is kept on disk next to the feature cache (``<cache>/engines/``), so
  a new process, a ``GridSearchCV`` worker or a CLI run reads it in a
  fraction of a second instead of converting again.
* ``"auto"``: OpenVINO on the CPU when it is installed, torch otherwise
  (and always on CUDA); ``precision="int8"``: ONNX Runtime on the int8
  network :mod:`~skltransfer.quantization` makes (the resolved engine is
  ``"onnxruntime"``).

OpenVINO's CPU default on processors with native bfloat16 (AVX-512 BF16,
AMX) is to compute in bfloat16, which changes the features (cosine ~0.9997):
here its inference precision is pinned to float32 unless
``precision="bfloat16"`` is asked for.
"""

from __future__ import annotations

import collections
import functools
import json
import hashlib
import os
import shutil
import tempfile
import threading
import warnings
from contextlib import nullcontext
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .cache import file_lock
from .preprocessing import Preprocessing
from .runtime import check_precision_runs_here

__all__ = [
    "ENGINES",
    "EngineFallbackWarning",
    "OpenVINOModel",
    "compile_openvino",
    "compile_openvino_or_warn",
    "openvino_available",
    "resolve_engine",
    "save_atomically",
]

ENGINES = ("auto", "torch", "openvino")
#: Precisions each engine can run (torch: autocast to 16-bit types).
ENGINE_PRECISIONS = {"torch": ("float32", "bfloat16", "float16"), "openvino": ("float32", "bfloat16")}
_OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16"}
#: Infer requests in flight: one computes while the next batch is decoded.
_REQUESTS = 2


class EngineFallbackWarning(UserWarning):
    """A model could not be run by the engine asked for; torch runs it instead."""


@functools.lru_cache(maxsize=1)
def openvino_available() -> bool:
    """Whether the ``openvino`` package imports here."""
    try:
        import openvino  # noqa: F401
    except Exception:  # ImportError, or a broken binary install
        return False
    return True


def resolve_engine(engine: str, device: torch.device, precision: str = "float32", *,
                   user_module: bool = False) -> str:
    """``"auto"``: OpenVINO on the CPU where installed and the precision allows, else torch.

    A user's own ``nn.Module`` runs with torch under ``"auto"``: converting
    it traces its ``forward``, side effects and all.

    Parameters
    ----------
    engine : {"auto", "torch", "openvino"}
    device : torch.device
        Where the model is to run (already resolved).
    precision : {"float32", "bfloat16", "float16"}
        The resolved precision.
    user_module : bool
        Whether the backbone is a user's module rather than a named one.

    Returns
    -------
    str
        ``"torch"``, ``"openvino"`` or, for int8, ``"onnxruntime"``.

    Raises
    ------
    ValueError
        For an unknown engine, OpenVINO asked for on CUDA or at a precision
        it does not run, or bfloat16 asked for on a CPU without native bfloat16.
    ImportError
        If ``engine="openvino"`` and OpenVINO is not installed, or int8 is
        asked for and ONNX Runtime is not.

    Examples
    --------
    >>> resolve_engine("torch", torch.device("cpu"))
    'torch'
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    check_precision_runs_here(precision, device)
    if precision == "int8":
        return _int8_engine(engine, user_module)
    if engine == "auto":
        usable = (device.type == "cpu" and not user_module and precision in ENGINE_PRECISIONS["openvino"]
                  and openvino_available())
        return "openvino" if usable else "torch"
    if engine == "openvino":
        if device.type != "cpu":
            raise ValueError(f"engine='openvino' runs on the CPU, but the device is {device}; use engine='torch'")
        if precision not in ENGINE_PRECISIONS["openvino"]:
            raise ValueError(
                f"engine='openvino' runs float32 or bfloat16, not precision={precision!r}; use engine='torch'"
            )
        if not openvino_available():
            raise ImportError("engine='openvino' needs the openvino package: pip install openvino")
    return engine


def _int8_engine(engine: str, user_module: bool) -> str:
    from .quantization import check_int8_available

    if engine != "auto":
        raise ValueError(
            f"precision='int8' runs on ONNX Runtime, not engine={engine!r}: use engine='auto'"
            + (" (OpenVINO computes other numbers from ONNX Runtime's int8 network; see skltransfer.quantization)"
               if engine == "openvino" else ""))
    if user_module:
        raise ValueError("precision='int8' quantises a named backbone (timm or torchvision); "
                         "an nn.Module backbone runs in float32 or 16-bit")
    check_int8_available()
    return "onnxruntime"


class OpenVINOModel:
    """A feature model compiled by OpenVINO: ``uint8 (N, 3, H, W)`` batch in, float32 rows out.

    Normalisation is part of the compiled model. :meth:`start` returns at
    once (the computation runs on OpenVINO's threads, outside the GIL), so
    the caller can decode the next batch meanwhile; ``__call__`` waits.

    Parameters
    ----------
    compiled : openvino.CompiledModel
    num_requests : int
        Batches in flight at once.
    """

    def __init__(self, compiled: Any, num_requests: int = _REQUESTS):
        self.compiled = compiled
        self._free = collections.deque(compiled.create_infer_request() for _ in range(num_requests))
        self._lock = threading.Lock()

    def start(self, batch: torch.Tensor | np.ndarray) -> "_Pending":
        """Start computing a batch; ``.result()`` of the returned handle gives its rows."""
        array = np.ascontiguousarray(batch.numpy() if isinstance(batch, torch.Tensor) else batch)
        with self._lock:
            request = self._free.popleft() if self._free else self.compiled.create_infer_request()
        request.start_async({0: array})
        return _Pending(self, request)

    def __call__(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.start(batch).result()

    def _release(self, request: Any) -> None:
        with self._lock:
            self._free.append(request)


class _Pending:
    """A batch being computed by OpenVINO."""

    def __init__(self, owner: OpenVINOModel, request: Any):
        self._owner = owner
        self._request = request
        self._rows: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self._rows is None:
            self._request.wait()
            self._rows = np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)
            self._owner._release(self._request)
        return self._rows


def compile_openvino(
    model: nn.Module,
    preprocessing: Preprocessing,
    *,
    precision: str = "float32",
    identity: dict[str, Any] | None = None,
    directory: str | os.PathLike | None = None,
) -> OpenVINOModel:
    """Convert a feature model to OpenVINO (or read a saved conversion) and compile it for this CPU.

    Parameters
    ----------
    model : torch.nn.Module
        Eval-mode feature model taking a normalised ``(N, 3, H, W)`` batch.
    preprocessing : Preprocessing
        Its input size, mean and std (normalisation is compiled in).
    precision : {"float32", "bfloat16"}
        OpenVINO's inference precision, pinned (its CPU default is bfloat16
        where the CPU has it).
    identity : dict, optional
        Everything that determines the model's computation (name, weight
        digest, options). With ``directory``, the conversion is saved under
        a digest of it and of the torch, timm and OpenVINO versions, and read
        back next time. Without it nothing is saved (a user's module, whose
        code may change under the same weights).
    directory : path, optional
        Where conversions are kept (``<feature cache>/engines``).

    Returns
    -------
    OpenVINOModel

    Examples
    --------
    >>> from skltransfer.backbones import load_backbone
    >>> b = load_backbone("test_efficientnet", weights=None)
    >>> fast = compile_openvino(b.model, b.preprocessing)
    >>> fast(torch.zeros(2, 3, 160, 160, dtype=torch.uint8)).shape
    (2, 256)
    """
    import openvino as ov

    if precision not in _OPENVINO_PRECISION:
        raise ValueError(f"OpenVINO runs float32 or bfloat16, not {precision!r}")
    core = ov.Core()
    digest = None if identity is None else _conversion_digest(identity)
    saved = None if digest is None or directory is None else Path(directory) / digest / "model.xml"
    # One process converts a configuration; others wait for its file (parallel GridSearchCV workers).
    with file_lock(saved.parent.with_suffix(".lock")) if saved is not None else nullcontext():
        with _CONVERTED_LOCK:
            converted = _CONVERTED.get(digest) if digest is not None else None
        if converted is None and saved is not None and saved.is_file():
            try:
                converted = core.read_model(saved)
            except Exception:  # a damaged file: convert again and replace it
                converted = None
                shutil.rmtree(saved.parent, ignore_errors=True)
        if converted is None:
            converted = _convert(model, preprocessing)
        if saved is not None and not saved.is_file():
            save_atomically(saved, functools.partial(_save_ir, converted))
    if digest is not None:
        with _CONVERTED_LOCK:
            _CONVERTED[digest] = converted
            _CONVERTED.move_to_end(digest)
            while len(_CONVERTED) > _CONVERTED_MAX:
                _CONVERTED.popitem(last=False)
    compiled = core.compile_model(converted, "CPU", {
        "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision],
        "PERFORMANCE_HINT": "LATENCY",  # one request uses every core
    })
    return OpenVINOModel(compiled)


def compile_openvino_or_warn(model: nn.Module, preprocessing: Preprocessing, what: str, *,
                             precision: str = "float32", identity: dict[str, Any] | None = None,
                             directory: str | os.PathLike | None = None) -> OpenVINOModel | None:
    """:func:`compile_openvino`, or None after one :class:`EngineFallbackWarning` naming ``what`` and why."""
    try:
        return compile_openvino(model, preprocessing, precision=precision, identity=identity, directory=directory)
    except Exception as exc:  # conversion errors come in many types
        warnings.warn(EngineFallbackWarning(
            f"{what} could not be converted to OpenVINO ({type(exc).__name__}: {str(exc)[:300]}); "
            "it runs with torch instead. Pass engine='torch' to skip the attempt."), stacklevel=4)
        return None


# digest -> converted model: a process converts a configuration once, whatever
# happens to the compiled models (registry evictions, another cache folder).
_CONVERTED: collections.OrderedDict[str, Any] = collections.OrderedDict()
_CONVERTED_LOCK = threading.Lock()
_CONVERTED_MAX = 4


def _convert(model: nn.Module, preprocessing: Preprocessing):
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    height, width = preprocessing.input_size
    example = torch.zeros(2, 3, height, width)
    with warnings.catch_warnings():  # tracer chatter about Python-level control flow
        warnings.simplefilter("ignore")
        converted = ov.convert_model(model, example_input=example, input=[(-1, 3, height, width)])
    # uint8 pixels in; x / 255, minus mean, over std, as Preprocessing.normalize does it.
    steps = PrePostProcessor(converted)
    steps.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NCHW"))
    steps.input().model().set_layout(ov.Layout("NCHW"))
    steps.input().preprocess().convert_element_type(ov.Type.f32).scale(255.0) \
        .mean(list(preprocessing.mean)).scale(list(preprocessing.std))
    steps.output().tensor().set_element_type(ov.Type.f32)
    return steps.build()


def _save_ir(converted: Any, path: Path) -> None:
    """``model.xml`` + ``model.bin``, weights kept in float32."""
    import openvino as ov

    ov.save_model(converted, path, compress_to_fp16=False)


def _conversion_digest(identity: dict[str, Any]) -> str:
    import openvino as ov
    import timm

    versions = {"openvino": ov.get_version(), "torch": torch.__version__, "timm": timm.__version__, "format": 1}
    text = json.dumps({"model": identity, "versions": versions}, sort_keys=True, default=str)
    return "openvino-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def save_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` make ``target`` in a new folder, then rename that folder into place.

    A reader sees a whole engine file (with its companions) or none; when two
    processes write at once, the first rename wins and the other's copy is
    dropped. A read-only or full disk only costs the next process a
    conversion.
    """
    try:
        target.parent.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent.parent))
        write(staging / target.name)
        try:
            os.rename(staging, target.parent)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass
