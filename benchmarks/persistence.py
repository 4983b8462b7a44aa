"""The safe model format against joblib, in one run: file size, save and load time.

Models: the README's pipeline (PretrainedFeatures() + LogisticRegression, fitted on the
hymenoptera training photos' cached features) and a FineTuneClassifier fine-tuned for
one epoch on 64 of those photos (EfficientNet-Lite0: its weights are in the file).
Load time is the median of 5 loads in this process, plus one first prediction in a
fresh process for each format (what a batch-scoring job pays).

    python benchmarks/persistence.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import joblib
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from skltransfer import FineTuneClassifier, PretrainedFeatures, load, load_image_folder, save

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(call, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fresh_process_predict(path: Path, image: str) -> float:
    code = ("import time, sys; start = time.perf_counter(); import skltransfer, joblib; "
            "p = sys.argv[1]; m = skltransfer.load(p) if p.endswith('.skops') else joblib.load(p); "
            "m.predict([sys.argv[2]]); print(time.perf_counter() - start)")
    done = subprocess.run([sys.executable, "-c", code, str(path), image], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    paths, labels = load_image_folder(args.data / "hymenoptera" / "train")
    models = {
        "README pipeline": make_pipeline(PretrainedFeatures(), LogisticRegression(max_iter=1000)).fit(paths, labels),
        "FineTuneClassifier": FineTuneClassifier(epochs=1, random_state=0).fit(paths[::4], labels[::4]),
    }
    folder = Path(tempfile.mkdtemp())
    for name, model in models.items():
        for fmt, (write, read) in {"joblib": (joblib.dump, joblib.load), "skops": (save, load)}.items():
            path = folder / f"{name.split()[0]}.{fmt}"
            save_s = timed(lambda: write(model, path), repeat=3)
            load_s = timed(lambda: read(path))
            first = fresh_process_predict(path, paths[0])
            print(f"{name:19s} {fmt:6s} {path.stat().st_size / 1024:9.0f} KiB  save {1000 * save_s:7.1f} ms  "
                  f"load {1000 * load_s:7.1f} ms  fresh process: import + load + first prediction {first:.2f} s")


if __name__ == "__main__":
    main()
