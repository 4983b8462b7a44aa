"""The documentation site builds with warnings as errors, examples included (docs/README.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.mark.slow
def test_the_site_builds_without_a_warning_and_runs_every_gallery_example(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("sphinx_gallery")
    pytest.importorskip("numpydoc")
    generated = [DOCS / "generated", DOCS / "auto_examples"]
    examples_before = sorted((ROOT / "examples").iterdir())
    existed = [p.exists() for p in generated]
    out = tmp_path / "html"
    env = {**os.environ, "SKLTRANSFER_CACHE_DIR": str(tmp_path / "feature-cache"), "MPLBACKEND": "Agg"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"),
             str(DOCS), str(out)],
            capture_output=True, text=True, env=env, timeout=1500,
        )
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
        pages = {p.relative_to(out).as_posix() for p in out.rglob("*.html")}
        assert {"index.html", "api.html", "finetune.html", "generated/skltransfer.PretrainedFeatures.html",
                "auto_examples/index.html", "auto_examples/plot_finetune_learning_curve.html"} <= pages
        # Every plot_ example ran and left its figure on its page.
        for example in sorted((ROOT / "examples").glob("plot_*.py")):
            html = (out / "auto_examples" / f"{example.stem}.html").read_text()
            assert "sphx-glr-single-img" in html or "sphx-glr-multi-img" in html, f"{example.name}: no figure"
        assert sorted((ROOT / "examples").iterdir()) == examples_before  # the examples wrote nothing there
    finally:
        for path, was_there in zip(generated, existed):
            if not was_there:
                shutil.rmtree(path, ignore_errors=True)
        (DOCS / "sg_execution_times.rst").unlink(missing_ok=True)
