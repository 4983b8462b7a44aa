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
