"""A longer fuzzing run of the decoding path than the test suite's, in one process per chunk.

Mutated JPEG, PNG, GIF, WebP, TIFF and BMP files (tests/_fuzz.py: bit flips, truncation,
header fields set to extremes, duplicated chunks) through PretrainedFeatures.transform.
Each chunk of cases runs in a fresh process with a time limit, so a crash or a hang is
counted, not fatal. Prints the counts: cases, features, named errors by reason, crashes,
hangs, the slowest case and the peak RSS.

    python benchmarks/fuzz_decoding.py [--cases 5000] [--chunk 500] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[1] / "tests" / "_fuzz.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    totals, reasons = Counter(), Counter()
    crashes, hangs, slowest, peak = [], [], 0.0, 0
    start = time.perf_counter()
    for seed in range(args.cases // args.chunk):
        try:
            done = subprocess.run([sys.executable, str(FUZZ), str(args.chunk), str(1000 + seed)],
                                  capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            hangs.append(seed)
            continue
        if done.returncode != 0:
            crashes.append((seed, done.returncode, done.stderr[-300:]))
            continue
        counts = json.loads(done.stdout.strip().splitlines()[-1])
        totals.update({k: counts[k] for k in ("cases", "features", "named_errors")})
        totals["unnamed"] += len(counts["unnamed"])
        reasons.update(counts["reasons"])
        slowest, peak = max(slowest, counts["slowest_case_s"]), max(peak, counts["peak_rss_mb"])
    print(f"{totals['cases']} cases in {time.perf_counter() - start:.0f} s "
          f"({args.cases // args.chunk} processes of {args.chunk})")
    print(f"features: {totals['features']}; named errors: {totals['named_errors']}; "
          f"reasons with a decoder's source line: {totals['unnamed']}")
    print("named errors by reason: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    print(f"crashed processes: {len(crashes)} {crashes}; hung processes: {len(hangs)} {hangs}")
    print(f"slowest case {slowest:.2f} s; peak RSS of a process {peak} MB")


if __name__ == "__main__":
    main()
