"""The ``skltransfer`` command line: train, predict, export, extract, cache, backbones, demo.

Thin: each command parses its arguments and calls the library
(:mod:`skltransfer.scoring` for streaming, the estimators for the rest).

Exit codes: 0 success; 1 failure (nothing or not everything was done: a
missing folder, model or weights); 2 usage error; 3 finished, but some
images could not be read (they are listed as error rows or on stderr).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_SOME_IMAGES_FAILED = 0, 1, 2, 3
EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 failure (nothing or not everything done); 2 usage error;\n"
    "            3 finished, but some images could not be read"
)


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
    from .datasets import write_digits_folder
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    say = (lambda *a: None) if args.quiet else print
    with tempfile.TemporaryDirectory(prefix="skltransfer-demo-") as tmp:
        if args.data is None:
            data = write_digits_folder(Path(tmp) / "digits", args.max_images)
            say(f"data: scikit-learn's handwritten digits as PNG files in {data}")
        else:
            data = Path(args.data)
            say(f"data: {data}")
        train_paths, test_paths, y_train, y_test, how = _split(data)
        say(f"split: {len(train_paths)} train / {len(test_paths)} test images ({how})")
        model = make_pipeline(
            _features(args),
            StandardScaler(),
            LogisticRegression(max_iter=2000, C=0.5),
        )
        start = time.perf_counter()
        model.fit(train_paths, y_train)
        hits = model[0].cache_info_.hits
        predicted = model.predict(test_paths)
        hits += model[0].cache_info_.hits
        seconds = time.perf_counter() - start
        tuned = _demo_finetune(args, train_paths, test_paths, y_train, y_test) if args.finetune else None
    n_images = len(train_paths) + len(test_paths)
    accuracy = accuracy_score(y_test, predicted)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_model(model, out)
    print(f"backbone: {args.backbone}")
    print(f"test accuracy: {accuracy:.1%} ({len(test_paths)} images)")
    print(f"throughput: {n_images / seconds:.1f} images/s end to end ({n_images} images in {seconds:.1f} s)")
    if hits:
        print(f"cache: {hits} of {n_images} images' features were already cached (--no-cache to recompute)")
    print(f"model: {out} ({out.stat().st_size / 1024:.0f} KiB)")
    if tuned is not None:
        print(tuned)
    return EXIT_OK


def _demo_finetune(args: argparse.Namespace, train_paths, test_paths, y_train, y_test) -> str:
    """FineTuneClassifier() on the same split: the line the demo prints beside the frozen pipeline."""
    from . import FineTuneClassifier

    start = time.perf_counter()
    clf = FineTuneClassifier(args.backbone, device=args.device, engine=args.engine or "auto", random_state=0,
                             cache=_cache_choice(args), verbose=not args.quiet).fit(train_paths, y_train)
    accuracy = clf.score(test_paths, y_test)
    kept = {None: "no validation split: every epoch ran", 0: "kept the frozen pipeline"}.get(
        clf.best_epoch_, f"kept fine-tuning epoch {clf.best_epoch_}")
    return (f"FineTuneClassifier(): test accuracy {accuracy:.1%} ({kept}; {time.perf_counter() - start:.0f} s; "
            "not saved: skltransfer train --head finetune saves one)")


def _weights(args: argparse.Namespace):
    value = getattr(args, "weights", "pretrained")
    return None if value == "none" else value


def _features(args: argparse.Namespace, backbone: str | None = None):
    from . import PretrainedFeatures

    return PretrainedFeatures(
        backbone=backbone or args.backbone,
        weights=_weights(args),
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision or "auto",
        engine=args.engine or "auto",
        num_workers=args.workers,
        max_image_pixels=_max_pixels(args),
        verbose=not args.quiet,
        cache=_cache_choice(args),
    )


def _cache_choice(args: argparse.Namespace, default: Any = "auto") -> Any:
    """``cache=`` from ``--cache`` / ``--no-cache`` (a folder or an fsspec URL; default: the model's own)."""
    return None if getattr(args, "no_cache", False) else (getattr(args, "cache", None) or default)


def _train(args: argparse.Namespace) -> int:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, classification_report
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from . import load_image_folder, stable_train_test_split

    paths, labels = load_image_folder(args.image_dir)
    train_paths, val_paths, y_train, y_val = stable_train_test_split(
        paths, labels, test_size=args.validation_fraction
    )
    if len(set(y_train)) < 2:
        raise ValueError(f"{args.image_dir}: need at least two classes with training images")
    heads = {
        "logistic": lambda: LogisticRegression(max_iter=2000, C=args.C),
        "mlp": lambda: MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=500,
                                     early_stopping=len(train_paths) >= 50, random_state=0),
    }
    if args.head == "finetune":
        from . import FineTuneClassifier

        unfreeze = args.unfreeze if args.unfreeze == "all" else int(args.unfreeze)
        model = FineTuneClassifier(
            backbone=args.backbone, weights=_weights(args), unfreeze=unfreeze, epochs=args.epochs, head_epochs=args.head_epochs,
            batch_size=args.batch_size, device=args.device, precision=args.precision or "auto",
            num_workers=0 if args.workers == "auto" else args.workers, max_image_pixels=_max_pixels(args),
            engine=args.engine or "auto", cache=_cache_choice(args), random_state=0, verbose=not args.quiet,
        )
    else:
        model = make_pipeline(_features(args), StandardScaler(), heads[args.head]())
    say = (lambda *a: None) if args.quiet else print
    say(f"{len(paths)} images, {len(set(labels))} classes; validation: {len(val_paths)} images "
        f"held out by file-name hash ({args.validation_fraction:.0%})")
    model.fit(train_paths, y_train)
    if val_paths:
        predicted = model.predict(val_paths)
        print(f"validation accuracy: {accuracy_score(y_val, predicted):.1%} ({len(val_paths)} images)")
        print(classification_report(y_val, predicted, zero_division=0))
    if args.refit:
        say("refitting on all images" + ("" if args.head == "finetune" else " (the features come from the cache)"))
        model.fit(paths, labels)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_model(model, out)
    print(f"model: {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return EXIT_OK


#: Model files in the safe format (skltransfer.save / load: no code runs on load).
SAFE_SUFFIX = ".skops"
ONNX_SUFFIX = ".onnx"


def _save_model(model, out: Path) -> None:
    import joblib

    from .persistence import save

    if out.suffix == SAFE_SUFFIX:
        save(model, out)
    else:
        joblib.dump(model, out)


def _load_model(path: str):

    if not Path(path).is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if Path(path).suffix == ONNX_SUFFIX:  # scored by ONNX Runtime: no torch needed
        from .serving import OnnxModel

        return OnnxModel(path)
    if Path(path).suffix == SAFE_SUFFIX:
        from .persistence import load

        return load(path)
    import joblib

    return joblib.load(path)  # a pickle: runs what it holds (the docs say: trusted files only)


def _configure_loaded(model, args: argparse.Namespace) -> None:
    """Apply the run's flags (device, batch size, ...) to the model's feature steps."""
    from .serving import OnnxModel

    if isinstance(model, OnnxModel):  # its graph is fixed: only the pixel limit applies
        if args.max_image_pixels is not None:
            model.max_image_pixels = _max_pixels(args)
        return
    from . import FineTuneClassifier, PretrainedFeatures

    steps = getattr(model, "steps", None) or [(None, model)]
    for _, step in steps:
        if isinstance(step, PretrainedFeatures):
            step.set_params(device=args.device, batch_size=args.batch_size, num_workers=args.workers,
                            precision=args.precision or step.precision, engine=args.engine or step.engine,
                            verbose=False, cache=_cache_choice(args, step.cache))
        if isinstance(step, FineTuneClassifier):
            step.set_params(cache=_cache_choice(args, step.cache))
        if isinstance(step, (PretrainedFeatures, FineTuneClassifier)):
            if args.max_image_pixels is not None:
                step.set_params(max_image_pixels=_max_pixels(args))
            if isinstance(step, FineTuneClassifier) and args.engine:
                step.set_params(engine=args.engine)


def _predict(args: argparse.Namespace) -> int:
    from .scoring import chunked, expand_image_paths, open_row_writer, prediction_columns, score_chunk

    model = _load_model(args.model)
    _configure_loaded(model, args)
    paths = list(expand_image_paths(args.images))
    if not paths:
        raise ValueError("no images found in: " + ", ".join(args.images))
    writer = open_row_writer(args.out, prediction_columns(args.top_k))
    failed = 0
    try:
        with _progress(len(paths), disable=args.quiet or args.out is None) as progress:
            for chunk in chunked(paths, args.chunk_size):
                rows = score_chunk(model, chunk, top_k=args.top_k)
                failed += sum(row["error"] is not None for row in rows)
                writer.write(rows)
                progress.update(len(chunk))
    finally:
        writer.close()
    if args.out is not None and not args.quiet:
        print(f"{len(paths) - failed} images scored, {failed} unreadable -> {args.out}", file=sys.stderr)
    return EXIT_SOME_IMAGES_FAILED if failed else EXIT_OK


def _progress(total: int, disable: bool):
    """tqdm's bar; where tqdm is not installed (a lean scoring environment), none."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        from contextlib import nullcontext
        from types import SimpleNamespace

        return nullcontext(SimpleNamespace(update=lambda n: None))
    return tqdm(total=total, disable=disable, unit="img")


def _export(args: argparse.Namespace) -> int:
    from .exporting import export

    if Path(args.model).suffix == ONNX_SUFFIX:
        raise ValueError(f"{args.model} is an ONNX file already")
    model = _load_model(args.model)
    path = export(model, args.out)
    if not args.quiet:
        print(f"{args.model} -> {path} ({path.stat().st_size / 2**20:.1f} MiB); score it with "
              f"'skltransfer predict {path} IMAGES' or any ONNX Runtime", file=sys.stderr)
    return EXIT_OK


def _extract(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .scoring import chunked, expand_image_paths, extract_chunk, open_row_writer

    paths = list(expand_image_paths(args.images))
    if not paths:
        raise ValueError("no images found in: " + ", ".join(args.images))
    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".parquet"):
        raise ValueError(f"unsupported output {out.name!r}: use .npy or .parquet")
    features = _features(args).set_params(verbose=False).fit(paths[:1])
    width = features.n_features_out_
    out.parent.mkdir(parents=True, exist_ok=True)
    kept: list[str] = []
    failures: list[tuple[str, str]] = []
    if suffix == ".npy":
        matrix = np.lib.format.open_memmap(out.with_suffix(".partial.npy"), mode="w+",
                                           dtype=np.float32, shape=(len(paths), width))
    else:
        columns = ["path"] + list(features.get_feature_names_out())
        parquet = open_row_writer(out, columns)
    with tqdm(total=len(paths), disable=args.quiet, unit="img") as progress:
        for chunk in chunked(paths, args.chunk_size):
            rows, good, errors = extract_chunk(features, chunk)
            failures += [(chunk[i], reason) for i, reason in errors.items()]
            if suffix == ".npy":
                matrix[len(kept) : len(kept) + len(good)] = rows
            else:
                parquet.write([dict(zip(columns, [chunk[i], *map(float, row)])) for i, row in zip(good, rows)])
            kept += [chunk[i] for i in good]
            progress.update(len(chunk))
    if suffix == ".npy":
        matrix.flush()
        final = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(len(kept), width))
        final[:] = matrix[: len(kept)]
        final.flush()
        del matrix, final
        out.with_suffix(".partial.npy").unlink()
        paths_file = out.with_suffix(".paths.txt")
        paths_file.write_text("".join(p + "\n" for p in kept), encoding="utf-8")
        where = f"{out} and {paths_file.name} (one path per row)"
    else:
        parquet.close()
        where = f"{out} (column 'path' beside the features)"
    for path, reason in failures:
        print(f"unreadable: {path}: {reason}", file=sys.stderr)
    if not args.quiet:
        print(f"{len(kept)} x {width} features -> {where}; {len(failures)} unreadable", file=sys.stderr)
    return EXIT_SOME_IMAGES_FAILED if failures else EXIT_OK


def _cache(args: argparse.Namespace) -> int:
    from .cache import FeatureCache
    from .objectstore import public_url

    store = FeatureCache(args.cache)
    if args.action == "clear":
        store.clear(shared=args.shared)
        print(f"cleared {store.path}")
        if store.shared_url is not None:
            url = public_url(store.shared_url)
            print(f"cleared {url}" if args.shared else f"kept the shared store {url} (--shared clears it too)")
        return EXIT_OK
    info = store.info()
    print(f"path:           {info['path']}")
    print(f"entries:        {info['entries']:,} ({info['configurations']} feature configurations)")
    print(f"feature bytes:  {info['feature_bytes']:,}")
    print(f"on disk:        {info['disk_bytes']:,} bytes")
    print(f"indexed paths:  {info['indexed_paths']:,}")
    print(f"engine models:  {info['engine_models']} converted ({info['engine_bytes']:,} bytes)")
    shared = info.get("shared")
    if shared is not None:
        print(f"shared store:   {shared['url']}")
        if "error" in shared:
            print(f"  unreachable:  {shared['error']}")
        else:
            print(f"  rows:         {shared['rows']:,} in {shared['objects']:,} objects "
                  f"({shared['configurations']} feature configurations, {shared['bytes']:,} bytes)")
        print(f"  to upload:    {info['unshared']:,} local rows the store does not have yet")
    return EXIT_OK


def _backbones(args: argparse.Namespace) -> int:
    from .weights import available_backbones

    rows = available_backbones()
    width = max(len(r["name"]) for r in rows)
    print(f"{'backbone':<{width}}  offline  where the weights are")
    for row in rows:
        print(f"{row['name']:<{width}}  {'yes' if row['offline'] else 'no ':<7}  {row['source']}")
    print("Any other timm name, or torchvision:<name>, downloads its weights on first use "
          "(or pass weights=/path/to/file).")
    return EXIT_OK


def _batch_size(value: str):
    return value if value == "auto" else int(value)


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        workers = int(value)
    except ValueError:
        workers = -1
    if workers < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {value!r}")
    return workers


def _max_pixels(args: argparse.Namespace) -> int | None:
    from .decoding import DEFAULT_MAX_IMAGE_PIXELS

    value = args.max_image_pixels
    if value is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    return None if value == 0 else value


def _backbone_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm name or torchvision:<name>")
    parser.add_argument("--weights", default="pretrained",
                        help="pretrained (default), none (random), or a local .pth / .safetensors file")


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    group.add_argument("--batch-size", type=_batch_size, default="auto", help="images per forward pass")
    group.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"],
                       help="forward-pass precision of the features (default auto: float32 on CPU, "
                            "16-bit on CUDA; predict: the model's own)")
    group.add_argument("--max-image-pixels", type=int, metavar="N",
                       help="refuse images with more pixels, from their headers, before decoding "
                            "(default 178956970, Pillow's decompression-bomb limit; 0: no limit, trusted "
                            "images only; predict: the model's own unless given)")
    group.add_argument("--engine", choices=["auto", "torch", "openvino"],
                       help="what runs the model (default auto: OpenVINO on the CPU when installed, "
                            "else torch; predict: the model's own)")
    group.add_argument("--workers", type=_workers, default="auto",
                       help="image decoding processes (default auto: none on the CPU, one per spare core on CUDA)")
    _cache_option(group)
    group.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    group.add_argument("--quiet", action="store_true", help="no progress bars or chatter")


def _cache_option(parser) -> None:
    parser.add_argument("--cache", "--cache-dir", dest="cache", metavar="FOLDER_OR_URL",
                        help="feature cache: a folder, or an fsspec URL every machine shares (s3://bucket/prefix, "
                             "gs://..., file:///mnt/shared/...) in front of which the default folder keeps a local "
                             "copy (default: $SKLTRANSFER_CACHE_DIR or ~/.cache/skltransfer, shared through "
                             "$SKLTRANSFER_CACHE_URL if set)")


def _command(commands, name: str, summary: str, description: str, examples: list[str]):
    parser = commands.add_parser(
        name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=description,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n" + EXIT_CODES_HELP,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skltransfer",
        description="Transfer learning for images with scikit-learn.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXIT_CODES_HELP,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    train = _command(commands, "train", "train a classifier on a folder of images",
                     "Fit pretrained features + a scikit-learn head on IMAGE_DIR/<class>/<image>, holding out a\n"
                     "validation set chosen by a hash of each file name (it does not move when images are\n"
                     "added); print validation accuracy and a per-class report; save the model.",
                     ["skltransfer train photos/ --out model.skops",
                      "skltransfer train photos/ --backbone tf_efficientnet_lite2 --head mlp --refit --out m.skops",
                      "skltransfer train photos/ --head finetune --out ft.skops"])
    train.add_argument("image_dir", metavar="IMAGE_DIR")
    _backbone_options(train)
    train.add_argument("--head", choices=["logistic", "mlp", "finetune"], default="logistic",
                       help="logistic / mlp: a head on frozen (cached) features; finetune: "
                       "FineTuneClassifier, the frozen pipeline's head fine-tuned with the backbone "
                       "(kept only where it beats the frozen features on held-out images)")
    train.add_argument("--unfreeze", default="all",
                       help="finetune: layer groups to train (an int or 'all'; default all, as FineTuneClassifier)")
    train.add_argument("--epochs", type=int, default=8,
                       help="finetune: most epochs with --unfreeze applied (default 8, as FineTuneClassifier)")
    train.add_argument("--head-epochs", type=int, default=0,
                       help="finetune: head-only epochs first (default 0, as FineTuneClassifier)")
    train.add_argument("--C", type=float, default=0.5, help="inverse regularisation of the logistic head")
    train.add_argument("--validation-fraction", type=float, default=0.2)
    train.add_argument("--refit", action="store_true", help="after validating, refit on every image")
    train.add_argument("--out", default="model.skops",
                       help="where to save the model: .skops (default) is the safe format, loaded without "
                            "running code; any other suffix is a joblib pickle (load only if trusted)")
    _common(train)
    train.set_defaults(run=_train)

    predict = _command(commands, "predict", "score images with a saved model",
                       "Stream any number of images (files, or folders walked recursively) through a saved\n"
                       "model in chunks, with flat memory. An unreadable image becomes an error row (path,\n"
                       "reason) and the run goes on. Output: CSV on stdout, or --out FILE.csv|.jsonl|.parquet.",
                       ["skltransfer predict model.skops new_photos/ --top-k 3 --out preds.csv",
                        "skltransfer predict model.skops a.jpg b.jpg",
                        "skltransfer predict model.onnx new_photos/ --out preds.csv   # no torch needed"])
    predict.add_argument("model", metavar="MODEL",
                         help="a model from train: .skops (safe: no code runs on load), .onnx (from export: "
                              "scored by ONNX Runtime) or a joblib file (a pickle: load only files from a "
                              "source you trust)")
    predict.add_argument("images", metavar="PATH", nargs="+", help="image files or folders")
    predict.add_argument("--top-k", type=int, default=1, help="ranked predictions per image")
    predict.add_argument("--out", help="predictions file (.csv, .jsonl, .parquet); default: CSV on stdout")
    predict.add_argument("--chunk-size", type=int, default=256, help="images per chunk")
    _common(predict)
    predict.set_defaults(run=_predict)

    export = _command(commands, "export", "write a saved model as one ONNX file (pixels in, label out)",
                      "Network, preprocessing and head in one ONNX graph that takes decoded RGB uint8\n"
                      "pixels of any size: score it with 'skltransfer predict model.onnx' (needs only\n"
                      "onnxruntime, numpy and Pillow) or any ONNX Runtime. Needs skltransfer[export].",
                      ["skltransfer export model.skops --out model.onnx"])
    export.add_argument("model", metavar="MODEL", help="a saved model: .skops or a joblib file (trusted)")
    export.add_argument("--out", default="model.onnx", help="the ONNX file to write (default model.onnx)")
    export.add_argument("--quiet", action="store_true", help="no chatter")
    export.set_defaults(run=_export)

    extract = _command(commands, "extract", "write pretrained features of images to a file",
                       "Compute (or read from the cache) one feature row per image. .npy: a float32 matrix,\n"
                       "paths in FILE.paths.txt beside it; .parquet: a 'path' column beside the features.\n"
                       "Unreadable images are skipped and listed on stderr.",
                       ["skltransfer extract photos/ --out features.npy",
                        "skltransfer extract --backbone torchvision:resnet50 photos/ --out f.parquet"])
    extract.add_argument("images", metavar="PATH", nargs="+", help="image files or folders")
    _backbone_options(extract)
    extract.add_argument("--out", required=True, help="features.npy or features.parquet")
    extract.add_argument("--chunk-size", type=int, default=512)
    _common(extract)
    extract.set_defaults(run=_extract)

    cache = _command(commands, "cache", "show or clear the feature cache",
                     "info: where the cache is (the local folder, and the shared store if there is one), how\n"
                     "many entries and bytes, how many rows wait to be uploaded. clear: delete the local cache;\n"
                     "with --shared, the shared store's rows too (every machine's).",
                     ["skltransfer cache info", "skltransfer cache info --cache s3://team-bucket/features",
                      "skltransfer cache clear --cache /scratch/features"])
    cache.add_argument("action", choices=["info", "clear"])
    _cache_option(cache)
    cache.add_argument("--shared", action="store_true", help="clear: also delete the shared store's rows")
    cache.set_defaults(run=_cache)

    backbones = _command(commands, "backbones", "list backbones whose weights are on this machine",
                         "Which backbone names work offline here (packaged or already downloaded), and which\n"
                         "need a download.", ["skltransfer backbones"])
    backbones.set_defaults(run=_backbones)

    demo = _command(commands, "demo", "train and score a classifier end to end on the offline default backbone",
                    "Fit PretrainedFeatures + LogisticRegression on a folder of images, print the\n"
                    "held-out accuracy and throughput, and save the model as one file.",
                    ["skltransfer demo                       # handwritten digits, no network needed",
                     "skltransfer demo --data photos/ --out photos.skops"])
    demo.add_argument("--data", metavar="DIR", help="class-per-folder images (DIR/<class>/<image>), "
                      "or DIR/train and DIR/test; default: scikit-learn's digits")
    demo.add_argument("--out", default="skltransfer-demo.skops",
                      help="where to save the model (.skops: the safe format; other suffixes: joblib)")
    demo.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm name or torchvision:<name>")
    demo.add_argument("--max-images", type=int, default=600,
                      help="digits only: how many to use (default 600; the full set is 1797)")
    demo.add_argument("--finetune", action="store_true",
                      help="also fit FineTuneClassifier() on the same split and print its test accuracy "
                           "(about 2 minutes on 2 CPU cores for the 474 training digits)")
    _common(demo)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from .decoding import ImageLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ImageLoadError, *_library_errors(), FileNotFoundError, ValueError) as exc:
        print(f"skltransfer {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _library_errors() -> tuple[type[Exception], ...]:
    """The training stack's errors, where it is installed (scoring an ONNX file needs none of it)."""
    try:
        from .weights import BackboneUnavailableError, WeightsMismatchError
    except ImportError:
        return ()
    return BackboneUnavailableError, WeightsMismatchError


if __name__ == "__main__":
    raise SystemExit(main())
