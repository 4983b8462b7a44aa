"""The exported ONNX file against the library, on real photos, in one run.

For hymenoptera (its test photos) and flowers5 (100 a class, tested on the stable split's 859):
fit the README's pipeline (``PretrainedFeatures()`` + ``LogisticRegression(max_iter=1000)``),
export it, and score the test images both ways from the JPEG files:

* parity: the share of images with the same label, the largest difference of a probability;
* OpenVINO reading the same file: its labels against ONNX Runtime's, its probabilities against ``predict``'s;
* throughput, images/s end to end from the files: ``OnnxModel`` (ONNX Runtime) against the
  library's own CPU path (``predict_proba``, feature cache off, its default engine);
* the file's size.

Then, in a lean virtual environment made for the run (onnxruntime, numpy and Pillow, skltransfer
installed with ``--no-deps``; pip's cache serves the wheels), the cold start of a new process
(import, load, first prediction; median of 5) against the same in this full environment (the
``.skops`` file, its OpenVINO conversion already cached), and the disk size of both environments.

    python benchmarks/export.py [--data ../shared/data] [--sets hymenoptera flowers5] [--no-lean]
        [--results benchmarks/results/export.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import cpu_model
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import skltransfer
from skltransfer import PretrainedFeatures, export, load_image_folder, stable_train_test_split
from skltransfer.serving import OnnxModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def load_set(name: str, data: Path):
    if name == "hymenoptera":
        train, y_train = load_image_folder(data / name / "train")
        test, y_test = load_image_folder(data / name / "test")
        return train, test, y_train, y_test
    if name == "flowers5":  # as benchmarks/finetune.py: the first 100 a class of a stable 80/20 split
        paths, labels = load_image_folder(data / "flowers5")
        train, test, y_train, y_test = stable_train_test_split(paths, labels, test_size=0.2)
        keep = np.concatenate([np.flatnonzero(y_train == c)[:100] for c in np.unique(y_train)])
        return [train[i] for i in keep], test, y_train[keep], y_test
    raise ValueError(f"unknown set {name!r}")


def images_per_second(score, paths, repeats: int = 2) -> float:
    score(paths[:8])  # warm: the model built or compiled, the session's first run
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        score(paths)
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best


def openvino_scores(path: Path, paths) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities from OpenVINO reading the file (float32, as the library pins it)."""
    import openvino as ov

    from skltransfer.decoding import decode_rgb_array
    from skltransfer.serving import OnnxModel

    preprocessing = OnnxModel(path).preprocessing
    compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    labels, probabilities = [], []
    for p in paths:
        result = compiled({"image": decode_rgb_array(p, preprocessing.resized_size)[None]})
        labels.append(result[compiled.output("label")][0])
        probabilities.append(result[compiled.output("probabilities")][0])
    return np.asarray(labels), np.asarray(probabilities)


def compare(name: str, data: Path, work: Path) -> dict:
    train, test, y_train, y_test = load_set(name, data)
    clf = make_pipeline(PretrainedFeatures(cache=None), LogisticRegression(max_iter=1000)).fit(train, y_train)
    onnx_path = export(clf, work / f"{name}.onnx")
    skltransfer.save(clf, work / f"{name}.skops")
    onnx_model = OnnxModel(onnx_path)
    expected = clf.predict_proba(test)
    got = onnx_model.predict_proba(test)
    labels = onnx_model.predict(test)
    same = float(np.mean(labels == clf.classes_[expected.argmax(1)]))
    ov_labels, ov_probabilities = openvino_scores(onnx_path, test)
    ov_same = float(np.mean(ov_labels == labels))
    library = images_per_second(clf.predict_proba, test)
    onnxruntime = images_per_second(onnx_model.predict_proba, test)
    row = {
        "set": name, "test_images": len(test),
        "same_label": same, "max_probability_difference": float(np.abs(got - expected).max()),
        "accuracy_library": float(np.mean(clf.predict(test) == y_test)),
        "accuracy_onnx": float(np.mean(labels == y_test)),
        "openvino_same_label_as_onnxruntime": ov_same,
        "openvino_max_probability_difference": float(np.abs(ov_probabilities - expected).max()),
        "file_mib": onnx_path.stat().st_size / 2**20,
        "skops_kib": (work / f"{name}.skops").stat().st_size / 2**10,
        "images_per_second_library": library, "images_per_second_onnxruntime": onnxruntime,
        "throughput_ratio": onnxruntime / library,
    }
    print(f"{name}: {len(test)} test images; same label {same:.2%}, largest probability difference "
          f"{row['max_probability_difference']:.2e}; accuracy {row['accuracy_library']:.2%} (library) vs "
          f"{row['accuracy_onnx']:.2%} (ONNX); OpenVINO reading the file: same label as ONNX Runtime on "
          f"{ov_same:.2%}; file {row['file_mib']:.1f} MiB (.skops {row['skops_kib']:.0f} KiB); "
          f"{onnxruntime:.1f} images/s ONNX Runtime vs {library:.1f} library = {row['throughput_ratio']:.2f}x",
          flush=True)
    return row


# -- the lean environment --------------------------------------------------------------------------

_LEAN_COLD = ("import sys; from skltransfer.serving import OnnxModel; "
              "print(OnnxModel(sys.argv[1]).predict([sys.argv[2]])[0])")
_FULL_COLD = ("import sys, skltransfer; print(skltransfer.load(sys.argv[1]).predict([sys.argv[2]])[0])")


def make_lean_environment(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "onnxruntime", "numpy", "pillow"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True)
    return python


def cold_start(python: Path, code: str, *args: str, repeats: int = 5) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        run = subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True, cwd=tempfile.gettempdir())
        times.append(time.perf_counter() - start)
        if run.returncode != 0:
            raise RuntimeError(run.stderr[-2000:])
        out = run.stdout.strip()
    return statistics.median(times), out


def disk_mib(prefix: Path) -> float:
    total = 0
    for folder, _, files in os.walk(prefix):
        for f in files:
            path = os.path.join(folder, f)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total / 2**20


def lean(work: Path, name: str, image: str) -> dict:
    python = make_lean_environment(work / "lean-venv")
    blocked = subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    lean_s, lean_label = cold_start(python, _LEAN_COLD, str(work / f"{name}.onnx"), image)
    full_s, full_label = cold_start(Path(sys.executable), _FULL_COLD, str(work / f"{name}.skops"), image)
    row = {"cold_start_lean_s": lean_s, "cold_start_full_s": full_s, "torch_absent_in_lean": blocked,
           "same_first_label": lean_label == full_label,
           "disk_lean_mib": disk_mib(work / "lean-venv"), "disk_full_mib": disk_mib(Path(sys.prefix))}
    row["disk_ratio"] = row["disk_lean_mib"] / row["disk_full_mib"]
    print(f"cold start (new process: import, load, first prediction; median of 5): lean {lean_s:.2f} s "
          f"(torch importable there: {not blocked}) vs full {full_s:.2f} s; labels agree: {row['same_first_label']}; "
          f"disk: lean environment {row['disk_lean_mib']:.0f} MiB vs full {row['disk_full_mib']:.0f} MiB "
          f"= {row['disk_ratio']:.1%}", flush=True)
    return row


def as_markdown(results: dict) -> str:
    """The results as the tables docs/export.md shows (written by this script, never by hand)."""
    lines = ["| | " + " | ".join(r["set"] for r in results["sets"]) + " |",
             "|---|" + "---|" * len(results["sets"])]
    rows = [("test images", lambda r: f"{r['test_images']}"),
            ("same label as `predict`", lambda r: f"{r['same_label']:.2%}"),
            ("largest difference of a probability", lambda r: f"{r['max_probability_difference']:.1e}"),
            ("accuracy: library / ONNX file", lambda r: f"{r['accuracy_library']:.1%} / {r['accuracy_onnx']:.1%}"),
            ("OpenVINO reading the file: same label as ONNX Runtime",
             lambda r: f"{r['openvino_same_label_as_onnxruntime']:.2%}"),
            ("OpenVINO reading the file: largest difference of a probability from `predict`",
             lambda r: f"{r['openvino_max_probability_difference']:.1e}"),
            ("images/s from JPEG files: ONNX Runtime / library (ratio)",
             lambda r: f"{r['images_per_second_onnxruntime']:.0f} / {r['images_per_second_library']:.0f} "
                       f"({r['throughput_ratio']:.2f}x)"),
            ("file size", lambda r: f"{r['file_mib']:.1f} MiB (the `.skops` file: {r['skops_kib']:.0f} KiB)")]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in results["sets"]) + " |")
    if "lean" in results:
        lean = results["lean"]
        lines += ["", "| | lean environment (ONNX file) | full environment (`.skops` file) |", "|---|---|---|",
                  f"| cold start: new process, import, load, first prediction (median of 5) | "
                  f"{lean['cold_start_lean_s']:.2f} s | {lean['cold_start_full_s']:.2f} s |",
                  f"| disk size of the environment | {lean['disk_lean_mib']:.0f} MiB ({lean['disk_ratio']:.1%}) | "
                  f"{lean['disk_full_mib']:.0f} MiB |"]
    lines += ["", f"Machine: {results['machine']}, no GPU. Command: `{results['command'].strip()}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sets", nargs="*", default=["hymenoptera", "flowers5"])
    parser.add_argument("--no-lean", action="store_true", help="skip the lean environment")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "export.json")
    args = parser.parse_args()
    import torch

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} threads "
          f"{torch.get_num_threads()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="skltransfer-export-"))
    try:
        rows = [compare(name, args.data, work) for name in args.sets]
        results = {"machine": f"{cpu_model()}, {os.cpu_count()} cores",
                   "command": "python benchmarks/export.py " + " ".join(sys.argv[1:]), "sets": rows}
        if not args.no_lean:
            first = args.sets[0]
            image = load_set(first, args.data)[1][0]
            results["lean"] = lean(work, first, image)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")
        args.results.with_suffix(".md").write_text(as_markdown(results))  # docs/export.md includes it
        print(f"results: {args.results} (and {args.results.with_suffix('.md').name})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
