"""``skltransfer demo`` as a new user runs it: a fresh process, an empty feature cache.

Runs the command in a subprocess with its own empty cache folder and writes its output to
results/demo.{json,md}: the transcript the README shows (temporary paths shortened to what a
reader would see), and its figures (test accuracy, throughput, model size).

    python benchmarks/demo.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import write_results


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "skltransfer-demo.skops"
        env = {**os.environ, "SKLTRANSFER_CACHE_DIR": str(Path(tmp) / "cache"), "PYTHONWARNINGS": "ignore"}
        done = subprocess.run([sys.executable, "-m", "skltransfer", "demo", "--out", str(out)],
                              capture_output=True, text=True, env=env, check=True)
        transcript = done.stdout.replace(str(out), "/home/me/skltransfer-demo.skops")
    transcript = re.sub(r"/tmp/skltransfer-demo-[^/\s]+", "/tmp/skltransfer-demo-...", transcript).rstrip("\n")
    print(transcript)
    figures = {
        "transcript": transcript.splitlines(),
        "test_accuracy": re.search(r"test accuracy: ([\d.]+)%", transcript).group(1) + "%",
        "images_per_second": float(re.search(r"throughput: ([\d.]+) images/s", transcript).group(1)),
        "model_kib": int(re.search(r"\((\d+) KiB\)", transcript).group(1)),
    }
    write_results("demo", figures, "```console\n$ skltransfer demo\n" + transcript + "\n```")


if __name__ == "__main__":
    main()
