"""int8 against float32 (and bfloat16 where native) on this machine's CPU, in one run.

Prints the CPU model, then, for photos (hymenoptera, decoded from large JPEGs) and small
images (cifar10-dev, 32 px):
  end to end   PretrainedFeatures(precision=...).transform from image files, cache off
               (decode, resize, network), images/s: float32 on the default engine
               (OpenVINO), bfloat16 on OpenVINO where the CPU has it natively, int8 on
               ONNX Runtime; then int8 / float32 (goal >= 1.8x on CPUs with VNNI or AMX,
               >= 1.2x on AVX2-only CPUs);
  model only   the same networks on uint8 batches already decoded and resized;
  accuracy     the README's frozen pipeline (PretrainedFeatures() + LogisticRegression)
               in float32 and int8 on hymenoptera, flowers5 (80/20 by file-name hash) and
               cifar10-dev, which decide, and cifar10-confirm, which confirms (goal: within
               0.5 points of float32 on every set);
  export       the pipeline fitted on hymenoptera exported as float and as int8 ONNX files:
               labels of the int8 file against the library's int8 path on both test sets
               (goal >= 99.5 % the same), and ONNX Runtime's throughput on the two files
               (goal >= 1.5x).
The fit of an int8 pipeline calibrates on up to 300 training images (its seconds are
printed too). Results: benchmarks/results/int8.json and .md.

    python benchmarks/int8.py [--data ../shared/data] [--repeat 2] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _machine import cpu_model
from _results import write_results
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import skltransfer
from skltransfer import PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.decoding import decode_rgb
from skltransfer.quantization import full_range_int8
from skltransfer.runtime import native_bfloat16

warnings.filterwarnings("ignore", category=UserWarning)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DECIDE = ("hymenoptera", "flowers5", "cifar10-dev")
CONFIRM = ("cifar10-confirm",)


def splits(root: Path, name: str):
    folder = root / name
    if (folder / "train").is_dir():
        train, y_train = load_image_folder(folder / "train")
        test, y_test = load_image_folder(folder / "test")
        return train, test, y_train, y_test
    paths, labels = load_image_folder(folder)
    return stable_train_test_split(paths, labels, test_size=0.2)


def precisions() -> list[str]:
    return ["float32", *(["bfloat16"] if native_bfloat16() else []), "int8"]


def end_to_end(train, test, precision: str, repeat: int) -> tuple[float, float, PretrainedFeatures]:
    """(images/s of transform, seconds of fit, the fitted transformer); cache off."""
    start = time.perf_counter()
    features = PretrainedFeatures(precision=precision, cache=None).fit(train)
    fit_seconds = time.perf_counter() - start
    features.transform(test[:12])  # the engine built and warm
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        features.transform(test)
        best = min(best, time.perf_counter() - start)
    return len(test) / best, fit_seconds, features


def model_only(features: PretrainedFeatures, test, repeat: int) -> float:
    """The network alone on uint8 batches already decoded and resized (the engine's own model)."""
    device = torch.device("cpu")
    precision = features.precision
    backbone = features._backbone(device, features._engine(device, precision), precision)
    p = backbone.preprocessing
    pixels = torch.stack([p.resize_crop(decode_rgb(item)) for item in test[:96]])
    batch = 6  # batch_size="auto" on the CPU at 224 px
    model = backbone.model
    model.start(pixels[:batch]).result()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        pending = [model.start(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
        for handle in pending:
            handle.result()
        best = min(best, time.perf_counter() - start)
    return len(pixels) / best


def accuracy(train, test, y_train, y_test, precision: str) -> tuple[float, object]:
    clf = make_pipeline(PretrainedFeatures(precision=precision, cache=None), LogisticRegression(max_iter=1000))
    clf.fit(train, y_train)
    return float(clf.score(test, y_test)), clf


def onnx_throughput(path: Path, pixels: np.ndarray, repeat: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {"image": pixels[:6]})
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(0, len(pixels), 6):
            session.run(None, {"image": pixels[i:i + 6]})
        best = min(best, time.perf_counter() - start)
    return len(pixels) / best


def export_check(clf_float, clf_int8, test_sets: dict, repeat: int) -> dict:
    """Labels of the int8 file against the library's int8 path; ONNX Runtime on both files."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as work:
        float_file = skltransfer.export(clf_float, Path(work) / "float.onnx")
        int8_file = skltransfer.export(clf_int8, Path(work) / "int8.onnx")
        session = ort.InferenceSession(str(int8_file), providers=["CPUExecutionProvider"])
        same = total = 0
        for name, paths in test_sets.items():
            library = clf_int8.predict(paths)
            for path, label in zip(paths, library):
                image = decode_rgb(path).permute(1, 2, 0).numpy()[None]
                same += int(session.run(None, {"image": image})[0][0] == label)
                total += 1
        # ONNX Runtime on the files alone: 224 x 224 pixels in (the network's own size)
        first = next(iter(test_sets.values()))
        p = clf_float[0].preprocessing_
        pixels = np.stack([p.resize_crop(decode_rgb(item)).permute(1, 2, 0).numpy() for item in first[:96]])
        speed_float = onnx_throughput(float_file, pixels, repeat)
        speed_int8 = onnx_throughput(int8_file, pixels, repeat)
        sizes = {"float_mb": float_file.stat().st_size / 2**20, "int8_mb": int8_file.stat().st_size / 2**20}
    return {"agreement": same / total, "images": total, "onnx_float": speed_float, "onnx_int8": speed_int8,
            **sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few images per set (checks the script runs)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    weights = "8-bit" if full_range_int8() else "7-bit (no VNNI/AMX)"
    print(f"CPU: {cpu_model()}; int8 weights: {weights}; native bfloat16: {native_bfloat16()}", flush=True)

    data = {name: splits(args.data, name) for name in DECIDE + CONFIRM if (args.data / name).is_dir()}
    if args.quick:
        def every(values, n=24):
            return values[::max(1, len(values) // n)]

        data = {name: tuple(every(part) for part in parts) for name, parts in data.items()}
    figures: dict = {"int8_weights": weights, "speed": {}, "accuracy": {}}

    for name in ("hymenoptera", "cifar10-dev"):
        if name not in data:
            continue
        train, test = data[name][0], data[name][1]
        rows = {}
        for precision in precisions():
            speed, fit_seconds, features = end_to_end(train, test, precision, args.repeat)
            rows[precision] = {"end_to_end": speed, "model_only": model_only(features, test, args.repeat),
                               "fit_seconds": fit_seconds}
            print(f"{name} {precision}: end to end {speed:.1f} img/s, model only "
                  f"{rows[precision]['model_only']:.1f} img/s, fit {fit_seconds:.1f} s", flush=True)
        figures["speed"][name] = rows

    fitted = {}
    for name, (train, test, y_train, y_test) in data.items():
        scores = {}
        for precision in ("float32", "int8"):
            scores[precision], fitted[name, precision] = accuracy(train, test, y_train, y_test, precision)
        figures["accuracy"][name] = scores
        print(f"{name}: float32 {scores['float32']:.2%}, int8 {scores['int8']:.2%}", flush=True)

    if "hymenoptera" in data:
        tests = {name: data[name][1] for name in ("hymenoptera", "cifar10-dev") if name in data}
        figures["export"] = export_check(fitted["hymenoptera", "float32"], fitted["hymenoptera", "int8"], tests,
                                         args.repeat)
        e = figures["export"]
        print(f"export: {e['agreement']:.2%} of {e['images']} labels as the library's int8; ONNX Runtime "
              f"{e['onnx_float']:.1f} -> {e['onnx_int8']:.1f} img/s", flush=True)
    if not args.quick:
        write_results("int8", figures, table(figures))


def table(figures: dict) -> str:
    lines = ["| images | precision | end to end (img/s) | x float32 | model only (img/s) | x float32 | fit (s) |",
             "|---|---|---|---|---|---|---|"]
    labels = {"hymenoptera": "photos (hymenoptera)", "cifar10-dev": "32 px (cifar10-dev)"}
    for name, rows in figures["speed"].items():
        base = rows["float32"]
        for precision, row in rows.items():
            lines.append(f"| {labels[name]} | {precision} | {row['end_to_end']:.0f} | "
                         f"{row['end_to_end'] / base['end_to_end']:.2f}x | {row['model_only']:.0f} | "
                         f"{row['model_only'] / base['model_only']:.2f}x | {row['fit_seconds']:.1f} |")
    lines += ["", "| set | role | float32 | int8 | difference (points) |", "|---|---|---|---|---|"]
    for name, scores in figures["accuracy"].items():
        role = "confirms" if name in CONFIRM else "decides"
        lines.append(f"| {name} | {role} | {scores['float32']:.1%} | {scores['int8']:.1%} | "
                     f"{100 * (scores['int8'] - scores['float32']):+.1f} |")
    if "export" in figures:
        e = figures["export"]
        lines += ["", "| exported file | ONNX Runtime (img/s) | size (MiB) |", "|---|---|---|",
                  f"| float32 | {e['onnx_float']:.0f} | {e['float_mb']:.1f} |",
                  f"| int8 | {e['onnx_int8']:.0f} ({e['onnx_int8'] / e['onnx_float']:.2f}x) | {e['int8_mb']:.1f} |",
                  "", f"The int8 file gives the library's int8 label for {e['agreement']:.1%} of "
                      f"{e['images']} test images. int8 weights: {figures['int8_weights']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
