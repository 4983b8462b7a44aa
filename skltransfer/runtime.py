"""The runtime policy: where and how models run in this process.

One owner for what depends on the machine rather than on the model: the
device (:func:`resolve_device`), the precision (:func:`resolve_precision`,
:func:`check_precision_runs_here`, :func:`native_bfloat16`,
:func:`training_autocast_dtype`), batch sizes (:func:`resolve_batch_size`,
:func:`train_batch_size`), decoding workers (:func:`resolve_num_workers`)
and threads (:func:`available_cores`, :func:`all_cores`,
:func:`one_torch_thread`).

Process-wide settings the library changes, all of them:

* torch's thread count, for a while and then restored: :func:`all_cores`
  (a process the others wait for uses every core) and
  :func:`one_torch_thread` (torch's own resizing beside an engine that has
  its threads);
* glibc's malloc thresholds, once per process, the first time torch
  computes on the CPU (extraction with ``engine="torch"``, fine-tuning):
  :func:`tune_allocator`, where the measured gain is; work that OpenVINO
  computes (the CPU's default engine, which allocates its own memory and
  measured no faster tuned) leaves them alone. ``SKLTRANSFER_MALLOC_TUNING=0``
  turns it off;
* Pillow's ``Image.MAX_IMAGE_PIXELS``, lifted for one header read under a
  lock when an image is over Pillow's limit but within ours, then restored:
  in :mod:`skltransfer.decoding`, which imports no torch (scoring an ONNX
  file goes through it) and so cannot live here.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = [
    "FEATURE_PRECISIONS",
    "PRECISIONS",
    "all_cores",
    "available_cores",
    "check_precision_runs_here",
    "native_bfloat16",
    "one_torch_thread",
    "resolve_batch_size",
    "resolve_device",
    "resolve_num_workers",
    "resolve_precision",
    "train_batch_size",
    "training_autocast_dtype",
    "tune_allocator",
]

#: ``batch_size="auto"`` on CUDA: large batches keep the GPU busy.
AUTO_CUDA_BATCH_SIZE = 64
#: ``batch_size="auto"`` on CPU: images per batch = this many pixels / image
#: pixels (6 at 224 x 224). Small batches keep activations in the CPU's
#: caches and the allocator's reused memory: EfficientNet-Lite0 on 2 cores
#: runs 126-142 images/s at batch 4-6, 105 at 8-16, 80 at 32.
AUTO_CPU_PIXELS = 6 * 224 * 224
AUTO_CPU_MAX_BATCH = 16


def resolve_batch_size(
    batch_size: int | str, device: torch.device, input_size: tuple[int, int] = (224, 224)
) -> int:
    """``"auto"`` picks a batch size for the device and input size; an int is returned as is.

    Examples
    --------
    >>> resolve_batch_size("auto", torch.device("cpu"))
    6
    >>> resolve_batch_size("auto", torch.device("cpu"), (320, 320))
    2
    >>> resolve_batch_size(32, torch.device("cpu"))
    32
    """
    if batch_size != "auto":
        return int(batch_size)
    if device.type == "cuda":
        return AUTO_CUDA_BATCH_SIZE
    height, width = input_size
    return max(1, min(AUTO_CPU_MAX_BATCH, AUTO_CPU_PIXELS // (height * width)))


def resolve_num_workers(num_workers: int | str, device: torch.device) -> int:
    """``"auto"``: no decoding processes on the CPU, one per spare core (at most 8) on CUDA.

    On the CPU the model already uses every core: EfficientNet-Lite0 from
    JPEGs on 2 cores with OpenVINO ran 177 images/s decoding in-process,
    152 with one worker and 151 with two (``benchmarks/extract.py``). On
    CUDA the model runs on the GPU, and decoding large photos on the CPU's
    other cores keeps it fed. Workers start anew for every call, which from
    a process holding a CUDA context takes seconds: on an NVIDIA H200
    machine, 1,000 CIFAR-size images extracted several times faster with no
    worker, so small images and small calls are better off with 0. An int
    is returned as is.

    Examples
    --------
    >>> resolve_num_workers("auto", torch.device("cpu"))
    0
    >>> resolve_num_workers(3, torch.device("cpu"))
    3
    """
    if num_workers != "auto":
        return int(num_workers)
    if device.type != "cuda":
        return 0
    return max(1, min(8, available_cores() - 1))


_ALLOCATOR_TUNED = False
TUNING_ENV = "SKLTRANSFER_MALLOC_TUNING"


def tune_allocator() -> bool:
    """Keep freed activation memory in glibc's heap (once per process, CPU path).

    With glibc's defaults every forward pass maps, faults in and unmaps its
    large activations: on 2 cores, EfficientNet-Lite0 at batch 8 spends about
    a third of its time in the kernel and runs ~50 instead of ~80 images/s.
    Raising the mmap threshold to its maximum (32 MB) and the trim threshold
    to 256 MB keeps those buffers in the heap for reuse. The cost: up to
    256 MB of freed memory stays with the process. ``SKLTRANSFER_MALLOC_TUNING=0``
    turns it off. Returns whether the settings were applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get(TUNING_ENV, "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
        ok &= libc.mallopt(m_trim_threshold, 256 * 1024 * 1024) == 1
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


def available_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextmanager
def all_cores() -> Iterator[None]:
    """Let torch use every available core for a while, then restore its setting.

    For a process that knows the others are waiting for it: joblib's loky
    workers start with ``cores // n_jobs`` threads each, which leaves cores
    idle while one worker computes features the others wait for.
    """
    before = torch.get_num_threads()
    wanted = available_cores()
    if wanted > before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is checked.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but CUDA is not available here")
    return resolved


#: Precisions a forward pass can run in: float32, or autocast to a 16-bit type.
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Precisions features can be computed in: those, and int8 (a calibrated network, on the CPU).
FEATURE_PRECISIONS = (*PRECISIONS, "int8")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: float32 on CPU; on CUDA bfloat16 where supported, else float16.

    16-bit autocast doubles CUDA tensor-core throughput and halves activation
    memory; on CPUs without native bfloat16 it is many times slower, so CPU
    stays in float32 unless asked.

    Examples
    --------
    >>> resolve_precision("auto", torch.device("cpu"))
    'float32'
    >>> resolve_precision("bfloat16", torch.device("cpu"))
    'bfloat16'
    """
    if precision == "auto":
        if device.type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if precision not in FEATURE_PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {sorted(FEATURE_PRECISIONS)}, got {precision!r}")
    return precision




@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's own operations (resizing) on one thread for a while."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)




@functools.lru_cache(maxsize=1)
def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX).

    Without it, bfloat16 is emulated and many times slower than float32, so
    ``precision="bfloat16"`` is refused on the CPU.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    try:  # other systems: ask OpenVINO's CPU plugin, where it is installed
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return False


def check_precision_runs_here(precision: str, device: torch.device, *, training: bool = False) -> None:
    """Refuse a resolved precision this device cannot run well.

    bfloat16 on a CPU without native bfloat16 is emulated, many times slower
    than float32; float16 training is for GPUs.

    Raises
    ------
    ValueError
        Saying what to use instead.

    Examples
    --------
    >>> check_precision_runs_here("float32", torch.device("cpu"))
    """
    if precision == "int8" and (training or device.type != "cpu"):
        raise ValueError(
            "precision='int8' computes features on the CPU with a calibrated int8 network; "
            + ("it does not train" if training else f"the device is {device}: use device='cpu', or 'auto' on a GPU")
        )
    if device.type != "cpu":
        return
    if training and precision == "float16":
        raise ValueError(f"precision={precision!r} training on this CPU: float16 is for GPUs; use 'auto' or "
                         "'float32'")
    if precision == "bfloat16" and not native_bfloat16():
        raise ValueError(
            "precision='bfloat16' needs a CPU with native bfloat16 (AVX-512 BF16 or AMX); this one emulates it, "
            "many times slower than float32. Use precision='float32' (the CPU default), or a GPU."
        )


def training_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training at ``precision`` (None: float32).

    ``"auto"`` resolves as for features on CUDA (:func:`resolve_precision`)
    and to float32 on the CPU, where bfloat16 autocast measured no faster
    for training.

    Examples
    --------
    >>> training_autocast_dtype("auto", torch.device("cpu")) is None
    True
    """
    if precision == "auto" and device.type != "cuda":
        return None
    resolved = resolve_precision(precision, device)
    if resolved == "float32":
        return None
    check_precision_runs_here(resolved, device, training=True)
    return PRECISIONS[resolved]


def train_batch_size(batch_size: int | str, device: torch.device) -> int:
    """Images per training step: ``"auto"`` is 64 on CUDA, 32 on the CPU; an int is returned as is.

    >>> train_batch_size("auto", torch.device("cpu"))
    32
    """
    if batch_size == "auto":
        return 64 if device.type == "cuda" else 32
    return int(batch_size)
