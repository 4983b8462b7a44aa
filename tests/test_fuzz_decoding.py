"""Fuzzing the decoding path: mutated JPEG, PNG, GIF, WebP, TIFF and BMP files.

300 cases (a fixed seed) run through ``PretrainedFeatures.transform`` in a
separate process, so that a crash shows as that process dying rather than
taking the test run with it. Every case must give features or an
``ImageLoadError`` with a readable reason, within time and memory bounds.
A longer run: ``python benchmarks/fuzz_decoding.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: Peak RSS bound for the whole fuzzing process: about 0.9 GB of torch and the
#: model, plus the largest image the default pixel limit admits (178,956,970
#: pixels decoded as RGB, and its copies).
MAX_RSS_MB = 3000
TIMEOUT_S = 180


def test_300_mutated_files_give_features_or_named_errors_without_crash_hang_or_bloat():
    script = Path(__file__).with_name("_fuzz.py")
    done = subprocess.run([sys.executable, str(script), "300", "0"], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, f"the fuzzing process died ({done.returncode}): {done.stderr[-3000:]}"
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["cases"] == 300
    assert counts["features"] + counts["named_errors"] == 300
    assert counts["features"] > 30 and counts["named_errors"] > 30  # the mutations reach both outcomes
    assert counts["unnamed"] == []  # no decoder source lines in a reason
    assert counts["reasons"].get("too many pixels", 0) > 0  # extreme headers met the limit
    assert counts["slowest_case_s"] < 10
    assert counts["peak_rss_mb"] < MAX_RSS_MB
