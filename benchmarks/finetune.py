"""Fine-tuning vs frozen features, and training speed, in one run.

For each data set: test accuracy of the README's frozen pipeline
(``PretrainedFeatures()`` + ``LogisticRegression(max_iter=1000)``) vs ``FineTuneClassifier``
(its defaults, or the parameters given with ``--param``) for each seed: test accuracy, wall
time, the epoch it kept (0: the probe, i.e. the frozen pipeline) and the validation accuracy of
every epoch (the held-out part of the *training* images: what chooses defaults; each test
split is scored once per fit, at the end). Then FineTuneClassifier's per-epoch training
throughput vs a hand-written timm training loop with the same settings; last, prediction speed
through the folded copy predict uses vs through the model as trained. With ``--fit-time``, one
cifar10-dev fit with every core, the defaults and then the ``--param`` setting, timed in the same
run (``results/finetune_fit_time``). With ``--backbone-speed NAME ...``, the training throughput of
the fit's own loop with each named timm backbone against the default's (``results/backbone_training_speed``).

    python benchmarks/finetune.py [--data ../shared/data] [--sets hymenoptera flowers5 cifar10 digits]
        [--seeds 0 1 2] [--param learning_rate=2e-4 ...] [--skip accuracy speed predict] [--jobs 1]
        [--fit-time] [--backbone-speed mobilenetv3_large_100 ...]

Sets: hymenoptera (its train/test folders), flowers5 at 100 a class (the first 100 a class of a
stable 80/20 hash split; tested on that split's 859), cifar10-dev (train/test folders), digits
(``skltransfer demo``'s: scikit-learn's 8 x 8 digits as PNG files, 600 images, the demo's stable
75/25 split). ``cifar10-confirm`` (not in the default sets): another 100-a-class CIFAR-10
sample, for confirming defaults chosen on the others, never for choosing them.
"""

from __future__ import annotations

import argparse
import ast
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_model
from _results import write_results
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from skltransfer import FineTuneClassifier, PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.backbones import load_classifier
from skltransfer.inference import extract_features, image_batches
from skltransfer.runtime import resolve_batch_size
from skltransfer.training import _batchnorm_to_eval, training_augmentation

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def hand_written_loop(paths, labels, epochs: int = 1, batch_size: int = 32) -> float:
    """The tutorials' loop with the defaults' settings: timm model, the same augmentation,
    BatchNorm in inference mode, AdamW, label-smoothed cross-entropy. Returns images/s."""
    classes, targets = np.unique(labels, return_inverse=True)
    model, pre, _ = load_classifier("tf_efficientnet_lite0", "pretrained", len(classes))
    model.train()
    _batchnorm_to_eval(model, set(), freeze_all=True)
    loader = image_batches(paths, training_augmentation(pre, "auto"), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    targets = torch.as_tensor(targets)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for indices, batch, _ in loader:
            x, target = pre.normalize(batch), targets[indices]
            optimizer.zero_grad()
            loss_fn(model(x), target).backward()
            optimizer.step()
            seen += len(target)
    return seen / (time.perf_counter() - start)


def load_set(name: str, data: Path, tmp: Path):
    if name in ("hymenoptera", "cifar10", "cifar10-confirm"):
        folder = data / ("cifar10-dev" if name == "cifar10" else name)
        train, y_train = load_image_folder(folder / "train")
        test, y_test = load_image_folder(folder / "test")
        return train, test, y_train, y_test
    if name == "flowers5":
        paths, labels = load_image_folder(data / "flowers5")
        train, test, y_train, y_test = stable_train_test_split(paths, labels, test_size=0.2)
        keep = np.concatenate([np.flatnonzero(y_train == c)[:100] for c in np.unique(y_train)])
        return [train[i] for i in keep], test, y_train[keep], y_test
    if name == "digits":
        from skltransfer.cli import _split  # the demo's split
        from skltransfer.datasets import write_digits_folder

        train, test, y_train, y_test, _ = _split(write_digits_folder(tmp / "digits", 600))
        return train, test, y_train, y_test
    raise ValueError(f"unknown set {name!r}")


def fit_one_seed(name, train, test, y_train, y_test, seed, params, threads=None) -> dict:
    """One ``FineTuneClassifier`` fit and its test score (in a process of its own with ``--jobs``)."""
    if threads:
        torch.set_num_threads(threads)
    clf = FineTuneClassifier(random_state=seed, **params)
    start = time.perf_counter()
    clf.fit(train, y_train)
    seconds = time.perf_counter() - start
    score = clf.score(test, y_test)
    paired = {}
    if clf.tta == "auto":  # the same fit scored with each mode too: a comparison free of training's noise
        chosen = clf.tta_
        for mode in (None, "flip"):
            clf.tta_ = mode
            paired[f"score_tta_{mode or 'none'}"] = score if mode == chosen else clf.score(test, y_test)
        clf.tta_ = chosen
        print(f"{name:<12} seed {seed}: tta chose {chosen}; test without {paired['score_tta_none']:6.1%}, "
              f"with mirrors {paired['score_tta_flip']:6.1%}", flush=True)
    valid = " ".join(f"{h['epoch']}:{h['valid_accuracy']:.3f}" for h in clf.history_ if "valid_accuracy" in h)
    speeds = [h["images_per_second"] for h in clf.history_ if h["phase"] != "probe"]
    print(f"{name:<12} seed {seed}: FineTuneClassifier {score:6.1%} ({seconds:4.0f} s, "
          f"{np.mean(speeds) if speeds else float('nan'):4.1f} training images/s), "
          f"kept epoch {clf.best_epoch_}; validation {valid}", flush=True)
    return {"score": score, "seconds": seconds, "kept": int(clf.best_epoch_), **paired}


def compare(name, train, test, y_train, y_test, seeds, params, jobs: int = 1) -> dict:
    frozen = make_pipeline(PretrainedFeatures(), LogisticRegression(max_iter=1000)).fit(train, y_train)
    base = frozen.score(test, y_test)
    print(f"{name:<12} {len(train)} train / {len(test)} test; frozen README pipeline: {base:6.1%}", flush=True)
    data = (name, train, test, y_train, y_test)
    if jobs > 1:  # seeds at once, one process each, the cores shared out between them
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        threads = max(1, torch.get_num_threads() // jobs)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            fits = list(pool.map(fit_one_seed, *zip(*[(*data, seed, params, threads) for seed in seeds])))
    else:
        fits = [fit_one_seed(*data, seed, params) for seed in seeds]
    scores, times, kept = [f["score"] for f in fits], [f["seconds"] for f in fits], [f["kept"] for f in fits]
    print(f"{name:<12} mean of {len(seeds)} seeds: {np.mean(scores):6.1%} vs frozen {base:6.1%} "
          f"({100 * (np.mean(scores) - base):+.1f} points), {np.mean(times):.0f} s a fit", flush=True)
    paired = {f"finetune_{k[len('score_'):]}": [f[k] for f in fits] for k in fits[0] if k.startswith("score_")}
    return {"set": name, "train_images": len(train), "test_images": len(test), "frozen": base,
            "seeds": list(seeds), "finetune": scores, "fit_seconds": times, "kept_epoch": kept, **paired}


def finetune_table(rows: list[dict]) -> str:
    """The table docs/finetune.md includes."""
    lines = ["| set | train / test images | frozen README pipeline | `FineTuneClassifier()`, mean of seeds "
             "(each seed) | kept epoch per seed | fit time, mean |", "|---|---|---|---|---|---|"]
    for r in rows:
        each = " / ".join(f"{s:.1%}" for s in r["finetune"])
        lines.append(f"| {r['set']} | {r['train_images']} / {r['test_images']} | {r['frozen']:.1%} | "
                     f"{np.mean(r['finetune']):.1%} ({each}) | {', '.join(map(str, r['kept_epoch']))} | "
                     f"{np.mean(r['fit_seconds']):.0f} s |")
    return "\n".join(lines)


def parse_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sets", nargs="*", default=["hymenoptera", "flowers5", "cifar10", "digits"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--param", nargs="*", default=[], help="FineTuneClassifier parameters, key=value")
    parser.add_argument("--skip", nargs="*", default=[], help="accuracy, speed or predict")
    parser.add_argument("--results", default="finetune", help="name of the results file (accuracy part)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds fitted at once (one process each)")
    parser.add_argument("--fit-time", action="store_true",
                        help="also time one cifar10-dev fit with every core: the defaults, then --param")
    parser.add_argument("--backbone-speed", nargs="*", default=[], metavar="NAME",
                        help="also measure the training throughput of these timm backbones against the default's")
    args = parser.parse_args()
    params = parse_params(args.param)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"FineTuneClassifier({', '.join(f'{k}={v!r}' for k, v in params.items())})", flush=True)
    if "accuracy" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [compare(name, *load_set(name, args.data, Path(tmp)), args.seeds, params, args.jobs)
                    for name in args.sets]
        write_results(args.results, {"parameters": {k: repr(v) for k, v in params.items()}, "sets": rows},
                      finetune_table(rows))
    if "speed" not in args.skip:
        train, y_train = load_image_folder(args.data / "hymenoptera" / "train")
        clf = FineTuneClassifier(**{"epochs": 1, "early_stopping": False, "init_head": "random", "random_state": 0,
                                    "max_grad_norm": None, **params})
        ours = clf.fit(train, y_train).history_[0]["images_per_second"]
        theirs = hand_written_loop(train, y_train)
        print(f"training throughput, the defaults' settings, batch 32: ours {ours:.1f} images/s, "
              f"hand-written timm loop {theirs:.1f} images/s: {ours / theirs:.2f}x (goal >= 0.9x)")
        write_results("finetune_speed", {"ours_images_per_second": ours, "timm_loop_images_per_second": theirs},
                      f"Training throughput with the defaults' settings (batch 32, hymenoptera photos): "
                      f"{ours:.1f} images/s, {ours / theirs:.2f}x a hand-written timm loop with the same model, "
                      f"augmentation, BatchNorm handling and optimiser ({theirs:.1f} images/s).")
    if "predict" not in args.skip:
        prediction_speed(args.data / "hymenoptera")
    if args.fit_time:
        fit_time(args.data, params)
    if args.backbone_speed:
        backbone_training_speed(args.data, args.backbone_speed)


def fit_time(data: Path, params: dict, seed: int = 0) -> None:
    """How long a 1,000-image fit of 32 px images takes (cifar10-dev, seed 0, every core): the defaults, then ``params``.

    One after the other in one run, so the ratio compares; the test score of that one seed is
    printed beside it (the accuracy of a setting is the mean of seeds in the accuracy tables).
    """
    with tempfile.TemporaryDirectory() as tmp:
        train, test, y_train, y_test = load_set("cifar10", data, Path(tmp))
    settings = {"defaults": {}, ", ".join(f"{k}={v!r}" for k, v in params.items()) or "defaults again": params}
    rows = []
    for label, setting in settings.items():
        clf = FineTuneClassifier(random_state=seed, **setting)
        start = time.perf_counter()
        clf.fit(train, y_train)
        seconds = time.perf_counter() - start
        rows.append({"setting": label, "seconds": seconds, "score": clf.score(test, y_test),
                     "kept_epoch": int(clf.best_epoch_)})
        print(f"cifar10-dev fit, {torch.get_num_threads()} threads, {label}: {seconds:.0f} s "
              f"(test {rows[-1]['score']:.1%}, kept epoch {clf.best_epoch_})", flush=True)
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    lines = ["| setting | fit time | test accuracy, this seed | kept epoch |", "|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min) | {r['score']:.1%} | "
              f"{r['kept_epoch']} |" for r in rows]
    lines += ["", f"A 1,000-image fit of 32 px images (cifar10-dev, `random_state={seed}`) with "
              f"{torch.get_num_threads()} threads: {ratio:.2f}x the defaults' time."]
    write_results("finetune_fit_time", {"threads": torch.get_num_threads(), "seed": seed, "fits": rows,
                                        "ratio": ratio}, "\n".join(lines))


def backbone_training_speed(data: Path, names: list[str], images: int = 320, epochs: int = 3) -> None:
    """Training images/s of the fit's own loop, the default backbone and then each of ``names``, in one run.

    Each backbone fine-tunes ``FineTuneClassifier(name, weights=None, epochs=epochs,
    early_stopping=False, init_head="random")`` on ``images`` cifar10-dev training images
    (spread over the classes) with every core: random weights, because a step's cost does not depend on the weights'
    values and the other backbones' pretrained weights need the network; so nothing here
    measures what they score. The throughput is the mean of the epochs' ``images_per_second``;
    a default fit's training (8 epochs on 800 images and 8 on 1,000: the validated run and the
    refit) scales with it, so the ratio applies to ``results/finetune_fit_time``'s fits.
    """
    with tempfile.TemporaryDirectory() as tmp:
        train, _, y_train, _ = load_set("cifar10", data, Path(tmp))
    keep = np.arange(0, len(train), max(1, len(train) // images))[:images]
    train, y_train = [train[i] for i in keep], y_train[keep]
    default = FineTuneClassifier().backbone
    rows = []
    for name in [default, *names]:
        clf = FineTuneClassifier(name, weights=None, epochs=epochs, early_stopping=False, init_head="random",
                                 random_state=0).fit(train, y_train)
        rates = [row["images_per_second"] for row in clf.history_ if row["phase"] == "tune"]
        rows.append({"backbone": name, "input_size": list(clf.preprocessing_.input_size),
                     "images_per_second": float(np.mean(rates)), "epochs": rates})
        rows[-1]["time_ratio"] = rows[0]["images_per_second"] / rows[-1]["images_per_second"]
        print(f"{name}: {rows[-1]['images_per_second']:.1f} training images/s, {rows[-1]['time_ratio']:.2f}x "
              f"the default's time", flush=True)
    lines = ["| backbone | input | training images/s | training time against the default |", "|---|---|---|---|"]
    lines += [f"| `{r['backbone']}` | {r['input_size'][0]} px | {r['images_per_second']:.1f} | {r['time_ratio']:.2f}x |"
              for r in rows]
    lines += ["", f"`FineTuneClassifier(backbone, weights=None, epochs={epochs}, early_stopping=False, "
              f"init_head='random')` on {len(train)} cifar10-dev training images, {torch.get_num_threads()} threads, "
              "one run; random weights, so the accuracy of these backbones is not measured here."]
    write_results("backbone_training_speed", {"threads": torch.get_num_threads(), "images": len(train),
                                              "backbones": rows}, "\n".join(lines))


def prediction_speed(folder: Path, repeats: int = 3) -> None:
    """predict_proba through the folded copy vs through ``model_`` as trained, same images."""
    train, y_train = load_image_folder(folder / "train")
    test, _ = load_image_folder(folder / "test")
    clf = FineTuneClassifier(unfreeze=2, epochs=1, random_state=0, engine="torch").fit(train[::4], y_train[::4])
    clf.predict_proba(test[:8])  # the folded copy is made here

    def as_trained(paths):  # what predict ran before: the trained module itself
        batch_size = resolve_batch_size("auto", torch.device("cpu"), clf.preprocessing_.input_size)
        return extract_features(clf.model_.eval(), clf.preprocessing_, paths, batch_size=batch_size)[0]

    timings: dict[str, list[float]] = {"folded": [], "as trained": []}
    logits = {}
    for _ in range(repeats):  # interleaved, best of each: the machine is noisy
        for name, run in (("folded", clf.decision_function), ("as trained", as_trained)):
            start = time.perf_counter()
            logits[name] = run(test)
            timings[name].append(time.perf_counter() - start)
    folded, trained = min(timings["folded"]), min(timings["as trained"])
    as_trained_margin = logits["as trained"][:, 1] - logits["as trained"][:, 0]  # decision_function, 2 classes
    gap = np.abs(logits["folded"] - as_trained_margin).max()
    print(f"FineTuneClassifier.predict_proba on {len(test)} photos: "
          f"folded copy {len(test) / folded:.1f} images/s, "
          f"model as trained {len(test) / trained:.1f} images/s: {trained / folded:.2f}x "
          f"(best of {repeats}; largest logit difference {gap:.1e})")
    write_results("finetune_predict", {"folded_images_per_second": len(test) / folded,
                                       "as_trained_images_per_second": len(test) / trained,
                                       "largest_logit_difference": float(gap)},
                  f"Prediction through the folded copy: {len(test) / folded:.0f} images/s against "
                  f"{len(test) / trained:.0f} through the model as trained, {trained / folded:.2f}x, on the "
                  f"{len(test)} hymenoptera test photos (largest logit difference {gap:.1e}).")


if __name__ == "__main__":
    main()
