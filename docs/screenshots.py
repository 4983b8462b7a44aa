"""Screenshots of the built site in headless Chromium, to look at it as a reader does.

    python docs/screenshots.py [--site docs/_build/html] [--out docs/_build/screenshots]

Takes the home page, two guide pages, the API page of each estimator and a gallery example,
at a laptop's window size, and prints where each PNG is. Needs Chromium (Debian: apt-get install
chromium). Offline: the site is read from disk, and Chromium's background networking is off.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGES = {  # name: (page, window height: the gallery page is long, its figure comes after the code)
    "home.png": ("index.html", 2000),
    "quickstart.png": ("quickstart.html", 2000),
    "guide-feature-options.png": ("feature-options.html", 2400),
    "api-pretrainedfeatures.png": ("generated/skltransfer.PretrainedFeatures.html", 2000),
    "api-finetuneclassifier.png": ("generated/skltransfer.FineTuneClassifier.html", 2000),
    "gallery-finetune-learning-curve.png": ("auto_examples/plot_finetune_learning_curve.html", 3400),
}
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, default=HERE / "_build" / "html")
    parser.add_argument("--out", type=Path, default=HERE / "_build" / "screenshots")
    parser.add_argument("--width", type=int, default=1280, help="window width in pixels")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (page, height) in PAGES.items():
        path = (args.site / page).resolve()
        if not path.is_file():
            raise SystemExit(f"{path} not found: build the site first (docs/README.md)")
        target = args.out / name
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={args.width},{height}",
                            f"--screenshot={target}", path.as_uri()],
                           check=True, capture_output=True, timeout=120)
        print(target)


if __name__ == "__main__":
    main()
