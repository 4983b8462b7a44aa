"""Batching images and running a backbone on a device.

One job: given a model, its preprocessing and a sequence of image items,
return one output row per item and the items that could not be read. Decoding, resizing and cropping run
per image (in DataLoader workers when ``num_workers > 0``) and yield
``uint8`` tensors; normalisation runs once per batch on the model's device
(or inside the compiled model, :mod:`~skltransfer.engines`). Two batches are
in flight: an engine that computes on its own threads (OpenVINO) works on one
while the next is decoded.

A bad image does not stop the scan: the remaining inputs are still decoded
(and, with ``keep_going``, computed), so that the caller can report every bad
file at once. :func:`image_batches` is the one path from items to batches:
extraction, fine-tuning, validation and prediction all read images through it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .decoding import DEFAULT_MAX_IMAGE_PIXELS, ImageFailure, ImageItem, SizeNeeded, describe_item, try_decode_rgb
from .engines import OpenVINOModel
from .preprocessing import Preprocessing
from .runtime import PRECISIONS, one_torch_thread, tune_allocator

__all__ = ["extract_features", "image_batches"]

class _Images(Dataset):
    """Item ``i`` -> ``(i, uint8 (3, H, W) or None, failure reason or None)``."""

    def __init__(self, items: Sequence[ImageItem], geometry: Callable[[torch.Tensor], torch.Tensor],
                 min_size: SizeNeeded | None, max_pixels: int | None):
        self.items, self.geometry, self.min_size, self.max_pixels = items, geometry, min_size, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        pixels, reason = try_decode_rgb(self.items[index], self.min_size, max_pixels=self.max_pixels)
        if pixels is None:
            return index, None, reason
        return index, self.geometry(pixels), None


def _collate(samples):
    indices = [index for index, pixels, _ in samples if pixels is not None]
    pixels = [pixels for _, pixels, _ in samples if pixels is not None]
    failures = [(index, reason) for index, pixels, reason in samples if pixels is None]
    batch = torch.stack(pixels) if pixels else None
    return indices, batch, failures


def image_batches(
    items: Sequence[ImageItem],
    geometry: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    min_size: SizeNeeded | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    num_workers: int = 0,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """The one path from image items to ``uint8`` batches, for extraction, training and prediction.

    Yields ``(indices, batch, failures)``: the positions in ``items`` of the
    images in ``batch`` (``uint8 (N, 3, H, W)``, or None when none of them
    could be read), and ``(position, reason)`` for those that could not.
    Each image is decoded (JPEGs reduced in the DCT down to twice
    ``min_size(h, w)`` where given) and passed through ``geometry`` (the eval
    resize and crop, or a training augmentation), in DataLoader workers when
    ``num_workers > 0``; with ``persistent_workers``, the same workers serve
    every pass over the loader (training's epochs) instead of starting anew
    for each, as timm's ``create_loader`` does: starting workers from a
    process that holds a CUDA context can take seconds.
    """
    return DataLoader(
        _Images(items, geometry, min_size, max_image_pixels),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def extract_features(
    model: nn.Module | OpenVINOModel,
    preprocessing: Preprocessing,
    items: Sequence[ImageItem],
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    verbose: bool = False,
    on_batch: Callable[[list[int], np.ndarray], None] | None = None,
    keep_going: bool = False,
    precision: str = "float32",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    width: int | None = None,
) -> tuple[np.ndarray, list[ImageFailure]]:
    """Run ``model`` over items: one output row per item, and the items that could not be read.

    Parameters
    ----------
    model : torch.nn.Module or OpenVINOModel
        A module on ``device`` taking normalised float batches (features,
        logits: any ``(N, width)`` output), or an engine's compiled model
        taking ``uint8`` batches (:mod:`skltransfer.engines`).
    preprocessing : Preprocessing
        The resize, crop and normalisation the model expects.
    items : sequence of image items
        Paths, bytes, PIL images or uint8 arrays (see :mod:`skltransfer.decoding`).
    batch_size : int
        Images per forward pass.
    device : str or torch.device
        Where the model runs.
    num_workers : int
        DataLoader worker processes for decoding (0: decode in this process).
    verbose : bool
        Show a tqdm progress bar.
    on_batch : callable, optional
        Called with ``(indices, rows)`` after every forward pass.
    keep_going : bool
        After a bad image, go on computing the good ones (so that ``on_batch``
        can keep them, in a cache say) instead of only decoding the rest.
    precision : {"float32", "bfloat16", "float16"}
        The forward pass's precision (16-bit: ``torch.autocast``); rows are
        returned as float32 either way.
    max_image_pixels : int or None
        Images with more pixels are failures, found from their headers
        before any pixel is decoded.
    width : int, optional
        The model's output width, where known: the rows have it even when no
        image could be read (else it is taken from the first batch).

    Returns
    -------
    rows : ndarray of shape (len(items), width), float32
        Rows of failed items (and, without ``keep_going``, of every item
        after the first failure) are undefined.
    failures : list of ImageFailure
        Every item that could not be read, in order; raise
        ``ImageLoadError(failures)`` to report them.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    compiled = not isinstance(model, nn.Module)
    dtype = None if compiled else PRECISIONS[precision]  # an engine's model runs at its own precision
    if device.type == "cpu" and not compiled:  # torch's activations; an engine allocates its own
        tune_allocator()
    loader = image_batches(
        items, preprocessing.resize_crop, batch_size=batch_size,
        # JPEGs 4x larger than the resize needs are decoded reduced, never below twice that.
        min_size=preprocessing.resized_size, max_image_pixels=max_image_pixels,
        num_workers=num_workers, pin_memory=device.type == "cuda",
    )
    # One (len(items), width) array, made now if the width is known, else from the first batch.
    out = [] if width is None else [np.empty((len(items), width), dtype=np.float32)]
    failures: list[ImageFailure] = []
    limit = [batch_size]  # lowered for good on out-of-memory
    in_flight: collections.deque = collections.deque()  # (indices, handle): started, not yet collected

    def collect() -> None:
        indices, handle = in_flight.popleft()
        rows = handle.result()
        if not out:
            out.append(np.empty((len(items), rows.shape[1]), dtype=np.float32))
        out[0][indices] = rows
        if on_batch is not None:
            on_batch(indices, rows)

    # A compiled model computes on its own threads, which take every core:
    # decoding the next batch meanwhile runs best on one torch thread.
    threads = one_torch_thread() if compiled and num_workers == 0 else nullcontext()
    with threads, tqdm(total=len(items), disable=not verbose, unit="img", desc="features") as progress:
        for indices, batch, batch_failures in loader:
            failures.extend(
                ImageFailure(i, describe_item(items[i]), reason) for i, reason in batch_failures
            )
            if batch is not None and (keep_going or not failures):
                started = model.start(batch) if compiled else _Done(
                    _forward_within_memory(model, preprocessing, batch, device, limit, dtype))
                in_flight.append((indices, started))
                while len(in_flight) > 1:
                    collect()
            progress.update(len(indices) + len(batch_failures))
        while in_flight:
            collect()
    return (out[0] if out else np.empty((len(items), width or 0), dtype=np.float32)), failures


class _Done:
    """A batch computed synchronously (torch), in the shape of an engine's pending handle."""

    def __init__(self, rows: np.ndarray):
        self._rows = rows

    def result(self) -> np.ndarray:
        return self._rows


_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _forward_within_memory(model: nn.Module, preprocessing: Preprocessing, batch: torch.Tensor,
                           device: torch.device, limit: list[int], dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Forward a batch in slices of at most ``limit[0]`` images, halving it on out-of-memory.

    The lowered limit holds for the rest of the call, so one oversized batch
    costs one failed attempt, not one per batch. Raises only if a single
    image does not fit.
    """
    rows, start = [], 0
    while start < len(batch):
        size = min(limit[0], len(batch) - start)
        try:
            rows.append(_forward(model, preprocessing, batch[start : start + size], device, dtype))
        except _OUT_OF_MEMORY:
            if size == 1:
                raise
            limit[0] = max(1, size // 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        start += size
    return rows[0] if len(rows) == 1 else np.concatenate(rows)


def _forward(model: nn.Module, preprocessing: Preprocessing, batch: torch.Tensor, device: torch.device,
             dtype: torch.dtype = torch.float32) -> np.ndarray:
    reduced = dtype != torch.float32
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=reduced):
        x = preprocessing.normalize(batch.to(device, non_blocking=True))
        x = x.contiguous(memory_format=torch.channels_last)
        return model(x).float().cpu().numpy()
