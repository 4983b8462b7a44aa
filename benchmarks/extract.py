"""Extraction speed on this machine, in one run.

Prints images/s for:
  raw          the model alone on pre-decoded, pre-normalised tensors at our settings
               (BatchNorm folded, channels_last, batch_size="auto", tuned allocator);
               also the model as loaded (BatchNorm kept) at batch 8, the previous default,
               and the folded model at batch sizes 2 to 32;
  ours         PretrainedFeatures end to end from JPEG files (cache off), for num_workers 0, 1, 2;
  loop         the tutorials' per-image loop: PIL open, timm's eval transform, model(x[None])
               on a plain eager timm model, in a fresh process (glibc's defaults, as a
               tutorial reader runs it);
  decode       decoding + resizing alone, one thread, and the ceiling it leaves on these
               cores: 1 / (1/raw + decode seconds per image) (the model already uses every
               core, so decoding cannot hide behind it);
then the ratios ours/raw (goal >= 0.85), ours/ceiling and ours/loop (goal >= 3), and peak RSS.

    python benchmarks/extract.py [--data ../shared/data] [--backbone NAME] [--repeat 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
import warnings
from pathlib import Path

import torch

from skltransfer import PretrainedFeatures, load_image_folder
from skltransfer.backbones import load_backbone, shared_backbone
from skltransfer.decoding import decode_rgb
from skltransfer.inference import resolve_batch_size, tune_allocator

warnings.filterwarnings("ignore", category=UserWarning)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def raw_throughput(name: str, paths: list[str], folded: bool = True, batch_size: int | None = None) -> float:
    backbone = shared_backbone(name) if folded else load_backbone(name)
    tune_allocator()
    bs = batch_size or resolve_batch_size("auto", torch.device("cpu"), backbone.preprocessing.input_size)
    pixels = torch.stack([backbone.preprocessing.resize_crop(decode_rgb(p)) for p in paths])
    batches = [backbone.preprocessing.normalize(pixels[i : i + bs]).contiguous(memory_format=torch.channels_last)
               for i in range(0, len(pixels), bs)]
    with torch.inference_mode():
        backbone.model(batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            backbone.model(batch)
    return len(paths) / (time.perf_counter() - start)


def decode_seconds(name: str, paths: list[str]) -> float:
    preprocessing = shared_backbone(name).preprocessing.with_crop("auto")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    for p in paths:
        preprocessing.resize_crop(decode_rgb(p))
    elapsed = time.perf_counter() - start
    torch.set_num_threads(before)
    return elapsed / len(paths)


def ours_throughput(name: str, paths: list[str], workers: int) -> float:
    f = PretrainedFeatures(name, cache=None, num_workers=workers).fit(paths)
    f.transform(paths[:16])  # warm-up: model built, threads started
    start = time.perf_counter()
    f.transform(paths)
    return len(paths) / (time.perf_counter() - start)


def loop_throughput(name: str, paths: list[str]) -> float:
    import timm
    from PIL import Image

    model = timm.create_model(name, pretrained=False).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.inference_mode():
        for p in paths[:5]:  # warm-up
            model(transform(Image.open(p).convert("RGB"))[None])
        start = time.perf_counter()
        for p in paths:
            model(transform(Image.open(p).convert("RGB"))[None])
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--repeat", type=int, default=2, help="passes over hymenoptera's 397 photos")
    parser.add_argument("--loop-images", type=int, default=200)
    args = parser.parse_args()
    paths, _ = load_image_folder(args.data / "hymenoptera" / "train")
    test, _ = load_image_folder(args.data / "hymenoptera" / "test")
    paths = (paths + test) * args.repeat
    print(f"{args.backbone}: {len(paths)} JPEG files (hymenoptera, 193-2592 px), {os.cpu_count()} cores, "
          f"torch {torch.__version__} threads={torch.get_num_threads()}")
    with multiprocessing.get_context("spawn").Pool(1) as fresh:
        loop = fresh.apply(loop_throughput, (args.backbone, paths[: args.loop_images]))
    print(f"per-image loop     {loop:7.1f} images/s (fresh process)", flush=True)
    unfolded = raw_throughput(args.backbone, paths[: len(paths) // args.repeat], folded=False, batch_size=8)
    print(f"raw model as loaded, batch 8 {unfolded:7.1f} images/s", flush=True)
    raw = raw_throughput(args.backbone, paths[: len(paths) // args.repeat])
    print(f"raw model          {raw:7.1f} images/s (BatchNorm folded, batch_size='auto')", flush=True)
    decode = decode_seconds(args.backbone, paths[: len(paths) // args.repeat])
    ceiling = 1 / (1 / raw + decode)
    print(f"decode + resize    {1000 * decode:7.2f} ms/image on one core -> ceiling {ceiling:.1f} images/s", flush=True)
    ours = {}
    for workers in (0, 1, 2):
        ours[workers] = ours_throughput(args.backbone, paths, workers)
        print(f"ours num_workers={workers} {ours[workers]:7.1f} images/s  ({ours[workers] / raw:.2f}x raw)", flush=True)
    best = max(ours, key=ours.get)
    print(f"ours (num_workers={best}) / raw = {ours[best] / raw:.2f}x (goal >= 0.85); "
          f"/ ceiling = {ours[best] / ceiling:.2f}x; "
          f"ours / per-image loop = {ours[best] / loop:.1f}x (goal >= 3)")
    print(f"peak RSS {peak_rss_mb():.0f} MB (before the batch sweep)", flush=True)
    sweep = {bs: raw_throughput(args.backbone, paths[: len(paths) // args.repeat], batch_size=bs)
             for bs in (2, 4, 6, 8, 16, 32)}
    print("raw model by batch size (what batch_size='auto' rests on): "
          + ", ".join(f"{bs}: {rate:.0f}" for bs, rate in sweep.items()) + " images/s", flush=True)



if __name__ == "__main__":
    main()
