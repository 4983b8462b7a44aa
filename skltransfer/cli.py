"""The ``skltransfer`` command line.

``skltransfer demo`` runs the main job end to end on the offline default
backbone: images in class folders -> PretrainedFeatures + LogisticRegression
-> accuracy on a held-out set -> one joblib file.

Exit codes: 0 success, 1 a runtime failure (bad images, missing weights),
2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _write_digits(folder: Path, max_images: int | None) -> Path:
    """scikit-learn's bundled handwritten digits, written out as PNG class folders."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.arange(len(digits.target))
    if max_images is not None and max_images < len(order):
        # every class equally, in the dataset's own order
        per_class = max(1, max_images // 10)
        order = np.concatenate([np.flatnonzero(digits.target == c)[:per_class] for c in range(10)])
    for i in order:
        label_dir = folder / str(digits.target[i])
        label_dir.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(label_dir / f"digit_{i:04d}.png")
    return folder


def _split(data: Path):
    from . import load_image_folder, stable_train_test_split

    if (data / "train").is_dir() and (data / "test").is_dir():
        train_paths, y_train = load_image_folder(data / "train")
        test_paths, y_test = load_image_folder(data / "test")
        return train_paths, test_paths, y_train, y_test, "train/ and test/ folders"
    paths, labels = load_image_folder(data)
    train_paths, test_paths, y_train, y_test = stable_train_test_split(paths, labels, test_size=0.25)
    return train_paths, test_paths, y_train, y_test, "a stable 75/25 split by file-name hash"


def _demo(args: argparse.Namespace) -> int:
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from . import PretrainedFeatures

    say = (lambda *a: None) if args.quiet else print
    with tempfile.TemporaryDirectory(prefix="skltransfer-demo-") as tmp:
        if args.data is None:
            data = _write_digits(Path(tmp) / "digits", args.max_images)
            say(f"data: scikit-learn's handwritten digits as PNG files in {data}")
        else:
            data = Path(args.data)
            say(f"data: {data}")
        train_paths, test_paths, y_train, y_test, how = _split(data)
        say(f"split: {len(train_paths)} train / {len(test_paths)} test images ({how})")
        model = make_pipeline(
            PretrainedFeatures(
                backbone=args.backbone,
                batch_size=args.batch_size,
                device=args.device,
                num_workers=args.workers,
                verbose=not args.quiet,
                cache=None if args.no_cache else "auto",
            ),
            StandardScaler(),
            LogisticRegression(max_iter=2000, C=0.5),
        )
        start = time.perf_counter()
        model.fit(train_paths, y_train)
        hits = model[0].cache_info_.hits
        predicted = model.predict(test_paths)
        hits += model[0].cache_info_.hits
        seconds = time.perf_counter() - start
    n_images = len(train_paths) + len(test_paths)
    accuracy = accuracy_score(y_test, predicted)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out)
    print(f"backbone: {args.backbone}")
    print(f"test accuracy: {accuracy:.1%} ({len(test_paths)} images)")
    print(f"throughput: {n_images / seconds:.1f} images/s end to end ({n_images} images in {seconds:.1f} s)")
    if hits:
        print(f"cache: {hits} of {n_images} images' features were already cached (--no-cache to recompute)")
    print(f"model: {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skltransfer",
        description="Transfer learning for images with scikit-learn.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 success, 1 runtime failure, 2 usage error",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="train and score a classifier end to end on the offline default backbone",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Fit PretrainedFeatures + LogisticRegression on a folder of images, print the\n"
            "held-out accuracy and throughput, and save the model as one joblib file.\n\n"
            "examples:\n"
            "  skltransfer demo                       # handwritten digits, no network needed\n"
            "  skltransfer demo --data photos/ --out photos.joblib"
        ),
    )
    demo.add_argument("--data", metavar="DIR", help="class-per-folder images (DIR/<class>/<image>), "
                      "or DIR/train and DIR/test; default: scikit-learn's digits")
    demo.add_argument("--out", default="skltransfer-demo.joblib", help="where to save the model")
    demo.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm name or torchvision:<name>")
    demo.add_argument("--max-images", type=int, default=600,
                      help="digits only: how many to use (default 600; the full set is 1797)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--batch-size", default="auto", type=lambda v: v if v == "auto" else int(v),
                      help="images per forward pass (default: auto)")
    demo.add_argument("--workers", type=int, default=0, help="image decoding processes")
    demo.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from .backbones import BackboneUnavailableError, WeightsMismatchError
    from .decoding import ImageLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ImageLoadError, BackboneUnavailableError, WeightsMismatchError, FileNotFoundError, ValueError) as exc:
        print(f"skltransfer {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
