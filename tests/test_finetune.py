"""FineTuneClassifier: what learns, what stays frozen, schedules, persistence, errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from torch import nn

from _support import TINY
from skltransfer import FineTuneClassifier, ImageLoadError, load_image_folder
from skltransfer.training import layer_groups

CPU = torch.device("cpu")


def tiny(**params) -> FineTuneClassifier:
    defaults = {"backbone": TINY, "weights": None, "epochs": 1, "random_state": 0, "batch_size": 8}
    return FineTuneClassifier(**{**defaults, **params})


@pytest.fixture
def data(image_folder):
    return load_image_folder(image_folder)


def _changed(before: dict, after: nn.Module) -> set[str]:
    now = after.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, now[k])}


def _initial_state(data, **params) -> dict:
    """State of the model fit() starts from: same seed path as fit uses."""
    clf = tiny(**params, epochs=0)
    clf.fit(*data)
    return {k: v.clone() for k, v in clf.model_.state_dict().items()}


def test_unfreeze_0_trains_only_the_head_and_keeps_batchnorm_statistics(data):
    initial = _initial_state(data)
    clf = tiny(unfreeze=0, epochs=2).fit(*data)
    changed = _changed(initial, clf.model_)
    assert changed and all(k.startswith(clf.classifier_) for k in changed), changed


def test_unfreeze_2_trains_the_last_two_groups_and_nothing_before(data):
    initial = _initial_state(data)
    clf = tiny(unfreeze=2, epochs=2, freeze_batchnorm=False).fit(*data)
    groups = layer_groups(clf.model_, clf.classifier_)
    changed = _changed(initial, clf.model_)
    last_two = set(groups[-1] + groups[-2])
    earlier = set(n for g in groups[:-2] for n in g)
    assert changed & last_two and not changed & earlier
    # BatchNorm running statistics of frozen groups did not move; trained ones did.
    frozen_bn = [k for k in initial if "running_mean" in k and k.rsplit(".", 1)[0] + ".weight" in earlier]
    trained_bn = [k for k in initial if "running_mean" in k and k.rsplit(".", 1)[0] + ".weight" in last_two]
    assert frozen_bn and not set(frozen_bn) & changed
    assert trained_bn and set(trained_bn) & changed


def test_by_default_no_batchnorm_statistic_moves_while_the_layers_learn(data):
    initial = _initial_state(data)
    clf = tiny(unfreeze="all", epochs=2).fit(*data)
    changed = _changed(initial, clf.model_)
    assert "conv_stem.weight" in changed and "bn1.weight" in changed  # BatchNorm's scale learns...
    assert not {k for k in changed if "running_" in k or "num_batches" in k}  # ...its statistics stay


def test_unfreeze_all_trains_the_stem(data):
    initial = _initial_state(data)
    clf = tiny(unfreeze="all", epochs=1).fit(*data)
    assert "conv_stem.weight" in _changed(initial, clf.model_)


def test_unfreeze_patterns_and_an_unknown_pattern(data):
    initial = _initial_state(data)
    clf = tiny(unfreeze=["blocks.4.*"], epochs=1).fit(*data)
    changed = _changed(initial, clf.model_)
    assert all(k.startswith(("blocks.4.", clf.classifier_)) for k in changed)
    assert any(k.startswith("blocks.4.") for k in changed)
    with pytest.raises(ValueError, match="matches no parameter"):
        tiny(unfreeze=["nothing.here.*"]).fit(*data)


def test_head_epochs_come_first_and_history_records_every_epoch(data):
    clf = tiny(head_epochs=1, epochs=2).fit(*data)
    assert [h["phase"] for h in clf.history_] == ["probe", "head", "tune", "tune"]
    assert [h["epoch"] for h in clf.history_] == [0, 1, 2, 3]
    assert clf.best_epoch_ is None  # 16 images: no validation split, the last state is kept
    clf = tiny(head_epochs=1, epochs=1, init_head="random").fit(*data)
    assert [h["phase"] for h in clf.history_] == ["head", "tune"]
    for h in clf.history_:
        assert {"train_loss", "train_accuracy", "learning_rate", "images_per_second"} <= set(h)


def test_head_only_phase_leaves_the_backbone_alone(data):
    initial = _initial_state(data)
    clf = tiny(head_epochs=2, epochs=0, unfreeze="all").fit(*data)
    assert all(k.startswith(clf.classifier_) for k in _changed(initial, clf.model_))


def test_early_stopping_records_validation_and_restores_the_best_epoch(data):
    clf = tiny(epochs=6, early_stopping=True, validation_fraction=0.25, n_iter_no_change=1,
               learning_rate=0.05, init_head="random", refit_epochs="kept").fit(*data)
    chosen = [h for h in clf.history_ if h["phase"] != "refit"]
    assert 1 <= len(chosen) <= 6
    assert all("valid_loss" in h and "valid_accuracy" in h for h in chosen)
    best = [h for h in chosen if h.get("best")]
    key = [(h["valid_accuracy"], -h["valid_loss"]) for h in chosen]
    assert len(best) == 1 and (best[0]["valid_accuracy"], -best[0]["valid_loss"]) == max(key)
    assert clf.best_epoch_ == best[0]["epoch"]
    # Then the winner trained again on every image, for as many epochs.
    refit = [h for h in clf.history_ if h["phase"] == "refit"]
    assert best[0]["refitted"] and [h["epoch"] for h in refit] == list(range(1, clf.best_epoch_ + 1))
    assert not any("valid_accuracy" in h for h in refit)


def _training_wins(monkeypatch):
    from skltransfer import training

    monkeypatch.setattr(training, "_choose", lambda candidates: candidates.get("trained"))


def test_a_fine_tuned_winner_is_refitted_on_every_image(monkeypatch):
    X, y = _blobs()
    _training_wins(monkeypatch)
    # The validation split chose epoch 1: the refit is the same training on all images, so the
    # same model as a fit that holds nothing out.
    clf = tiny(epochs=1, early_stopping=True, learning_rate=1e-3, refit=True).fit(X, y)
    assert clf.best_epoch_ == 1
    assert [(h["phase"], h["epoch"]) for h in clf.history_] == [("probe", 0), ("tune", 1), ("refit", 1)]
    assert clf.history_[1]["refitted"]
    unsplit = tiny(epochs=1, early_stopping=False, learning_rate=1e-3).fit(X, y)
    np.testing.assert_array_equal(clf.predict_proba(X), unsplit.predict_proba(X))
    # refit=False keeps the state trained on the other 80 %.
    kept = tiny(epochs=1, early_stopping=True, learning_rate=1e-3, refit=False).fit(X, y)
    assert [h["phase"] for h in kept.history_] == ["probe", "tune"] and "refitted" not in kept.history_[1]
    assert not np.allclose(kept.predict_proba(X), unsplit.predict_proba(X))


def test_refit_average_keeps_the_mean_of_the_validated_and_the_refitted_weights(monkeypatch):
    from skltransfer import training

    X, y = _blobs()
    _training_wins(monkeypatch)
    params = dict(epochs=2, early_stopping=True, learning_rate=1e-3)
    validated = tiny(**params, refit=False).fit(X, y)
    refitted = tiny(**params, refit=True).fit(X, y)
    averaged = tiny(**params).fit(X, y)  # the default
    for name, weight in averaged.model_.state_dict().items():
        if weight.is_floating_point():
            expected = (validated.model_.state_dict()[name] + refitted.model_.state_dict()[name]) / 2
            torch.testing.assert_close(weight, expected, msg=name)
    final = _final(averaged.history_)
    assert final is averaged.history_[-1] and final["phase"] == "refit" and final["mean_with_kept"]
    assert final["validated"] is False and averaged.history_[averaged.best_epoch_]["refitted"]
    # Where the probe wins there is nothing to average: the frozen pipeline, as with refit=True.
    monkeypatch.setattr(training, "_choose", lambda candidates: candidates.get("start"))
    probe = tiny(**params).fit(X, y)
    np.testing.assert_array_equal(probe.predict_proba(X), tiny(**params, refit=True).fit(X, y).predict_proba(X))
    assert not any(h.get("mean_with_kept") for h in probe.history_)
    with pytest.raises(ValueError, match="refit"):
        tiny(refit="mean").fit(X, y)


def test_refit_epochs_all_validates_and_refits_the_whole_schedule(monkeypatch):
    from skltransfer import training

    X, y = _blobs()
    _training_wins(monkeypatch)

    def falling_scores():  # validation scores fall after epoch 1
        scores = iter([0.5, 0.9, 0.8, 0.7])

        def falling(model, items, targets, *args, **kwargs):
            return {"valid_loss": 1.0, "valid_accuracy": next(scores)}, np.ones(len(targets), bool)

        monkeypatch.setattr(training, "evaluate", falling)

    params = dict(epochs=3, early_stopping=True, learning_rate=1e-3, n_iter_no_change=1, random_state=0)
    falling_scores()
    kept = tiny(**params, refit_epochs="kept").fit(X, y)
    falling_scores()
    whole = tiny(**params, refit_epochs="all", refit=True).fit(X, y)
    # "kept" stops after one epoch without a better state and keeps epoch 1; "all" trains the whole
    # schedule on the split too, and sets its last state against the probe: what the refit repeats.
    assert [h["epoch"] for h in kept.history_ if h["phase"] == "tune"] == [1, 2] and kept.best_epoch_ == 1
    assert [h["epoch"] for h in whole.history_ if h["phase"] == "tune"] == [1, 2, 3] and whole.best_epoch_ == 3
    refit_rows = [[h["epoch"] for h in clf.history_ if h["phase"] == "refit"] for clf in (kept, whole)]
    assert refit_rows == [[1], [1, 2, 3]]
    assert _final(whole.history_)["phase"] == "refit" and _final(whole.history_)["validated"] is False
    # The whole schedule on every image: the same model as a fit that holds nothing out.
    unsplit = tiny(epochs=3, early_stopping=False, learning_rate=1e-3, random_state=0).fit(X, y)
    np.testing.assert_array_equal(whole.predict_proba(X), unsplit.predict_proba(X))


def _final(history):
    rows = [h for h in history if h.get("final")]
    assert len(rows) == 1, "exactly one row holds the state the model ends with"
    return rows[0]


def test_the_history_says_which_state_the_model_holds_and_whether_it_was_validated(monkeypatch, data):
    X, y = _blobs()
    _training_wins(monkeypatch)
    refitted = tiny(epochs=1, early_stopping=True, learning_rate=1e-3).fit(X, y)
    assert _final(refitted.history_) is refitted.history_[-1]  # the refit's last epoch: nothing scored it
    assert refitted.history_[-1]["phase"] == "refit" and refitted.history_[-1]["validated"] is False
    kept = tiny(epochs=1, early_stopping=True, learning_rate=1e-3, refit=False).fit(X, y)
    final = _final(kept.history_)  # the very state the split scored
    assert final["best"] and final["validated"] is True and "valid_accuracy" in final
    unsplit = tiny(epochs=2, early_stopping=False).fit(*data)
    assert _final(unsplit.history_) is unsplit.history_[-1] and unsplit.history_[-1]["validated"] is False
    unsplit.set_params(warm_start=True, epochs=1).fit(*data)  # the earlier fit's mark moves to the new end
    assert _final(unsplit.history_) is unsplit.history_[-1]


def test_weight_averaging_changes_which_weights_are_kept_not_how_they_train():
    X, y = _blobs()
    plain = tiny(epochs=3, early_stopping=False, learning_rate=3e-3, ema_epochs=None).fit(X, y)
    averaged = tiny(epochs=3, early_stopping=False, learning_rate=3e-3, ema_epochs=1.0).fit(X, y)
    # The same steps (the average is read, never trained) ...
    losses = [[h["train_loss"] for h in clf.history_ if h["phase"] == "tune"] for clf in (plain, averaged)]
    assert len(losses[0]) == 3 and losses[1] == losses[0]
    assert all(h["averaged"] for h in averaged.history_ if h["phase"] == "tune")
    # ... but the model keeps their moving average, which is not where the last step left the weights.
    head = averaged.classifier_ + ".weight"
    assert not torch.allclose(averaged.model_.state_dict()[head], plain.model_.state_dict()[head])
    # A window shorter than one step is no average at all.
    instant = tiny(epochs=3, early_stopping=False, learning_rate=3e-3, ema_epochs=1e-6).fit(X, y)
    np.testing.assert_allclose(instant.predict_proba(X), plain.predict_proba(X), atol=1e-6)


def test_with_weight_averaging_validation_scores_the_averaged_state_the_model_keeps(monkeypatch):
    from skltransfer.training import evaluate

    X, y = _blobs()
    _training_wins(monkeypatch)
    clf = tiny(epochs=2, early_stopping=True, learning_rate=3e-3, ema_epochs=1.0, refit=False).fit(X, y)
    final = _final(clf.history_)
    assert final["validated"] and final["averaged"] and final["phase"] == "tune"
    # The split the fit made (its seed comes from random_state=0), scored again with the model as kept.
    targets = np.unique(y, return_inverse=True)[1]
    _, valid = clf._validation_split(targets, int(np.random.RandomState(0).randint(0, 2**31 - 1)))
    again = evaluate(clf.model_, [X[i] for i in valid], targets[valid], clf.preprocessing_, None, 8,
                     torch.device("cpu"))
    assert again["valid_accuracy"] == final["valid_accuracy"]
    assert again["valid_loss"] == pytest.approx(final["valid_loss"], abs=1e-5)


def test_the_same_random_state_gives_the_same_model_on_cpu(data):
    a = tiny(random_state=3, epochs=2).fit(*data).predict_proba(data[0])
    b = tiny(random_state=3, epochs=2).fit(*data).predict_proba(data[0])
    c = tiny(random_state=4, epochs=2).fit(*data).predict_proba(data[0])
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_string_labels_classes_and_output_shapes(data):
    paths, labels = data
    clf = tiny(class_weight="balanced").fit(paths, labels)
    assert list(clf.classes_) == ["blue", "red"]
    assert set(clf.predict(paths)) <= {"blue", "red"}
    proba = clf.predict_proba(paths)
    assert proba.shape == (16, 2) and np.allclose(proba.sum(1), 1)
    assert clf.decision_function(paths).shape == (16,)
    three = np.array(["a", "b", "c", "a"] * 4)
    assert tiny().fit(paths, three).decision_function(paths).shape == (16, 3)


def test_training_separable_classes_reaches_high_accuracy(data):
    clf = tiny(unfreeze="all", epochs=4, learning_rate=3e-3, augment=False).fit(*data)
    assert clf.score(*data) >= 0.9


def test_augment_false_and_a_callable(data):
    calls = []

    def geometry(image):
        calls.append(image.shape)
        return torch.nn.functional.interpolate(image[None].float(), size=(160, 160))[0].to(torch.uint8)

    tiny(augment=geometry).fit(*data)
    assert len(calls) == 16
    tiny(augment=False).fit(*data)


def test_warm_start_continues_training(data):
    clf = tiny(epochs=1, warm_start=True).fit(*data)
    first = {k: v.clone() for k, v in clf.model_.state_dict().items()}
    clf.fit(*data)
    assert [h["epoch"] for h in clf.history_] == [0, 1, 2] and _changed(first, clf.model_)  # no second probe
    with pytest.raises(ValueError, match="classes changed"):
        clf.fit(data[0], np.array(["x", "y"] * 8))


def test_predictions_follow_further_training_and_match_a_reloaded_model(data):
    paths, labels = data
    clf = tiny(epochs=1, warm_start=True).fit(paths, labels)
    first = clf.predict_proba(paths)
    clf.fit(paths, labels)  # trains the same module further
    second = clf.predict_proba(paths)
    assert np.abs(second - first).max() > 1e-4
    # A reloaded model has no folded copy yet: it predicts from the weights as trained.
    reloaded = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(reloaded.predict_proba(paths), second, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "X, y, message",
    [(["a.jpg"] * 4, ["one"] * 4, "two classes"), (["a.jpg"] * 4, ["x", "y"], "different lengths")],
)
def test_bad_training_data_is_refused(X, y, message):
    with pytest.raises(ValueError, match=message):
        tiny().fit(X, y)


def test_an_unreadable_training_image_is_named(data, tmp_path):
    paths, labels = data
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        tiny().fit(paths + [str(bad)], list(labels) + ["red"])


def test_joblib_round_trip_in_a_fresh_process_predicts_identically(data, tmp_path):
    paths, labels = data
    clf = tiny(epochs=2).fit(paths, labels)
    out = tmp_path / "ft.joblib"
    joblib.dump(clf, out)
    loaded = joblib.load(out)
    assert all(v.device.type == "cpu" for v in loaded.model_.state_dict().values())
    script = textwrap.dedent(f"""
        import json, sys, joblib
        clf = joblib.load({str(out)!r})
        paths = json.loads(sys.stdin.read())
        print(json.dumps([clf.predict(paths).tolist(), clf.predict_proba(paths).tolist()]))
    """)
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(paths), capture_output=True,
                          text=True, check=True)
    labels_there, proba_there = json.loads(done.stdout)
    assert labels_there == clf.predict(paths).tolist()
    # Same weights, same numbers up to float32 summation order (thread counts differ between processes).
    np.testing.assert_allclose(np.array(proba_there), clf.predict_proba(paths), rtol=0, atol=1e-6)


def test_clone_pipeline_and_gridsearch(data):
    paths, labels = data
    clf = tiny(unfreeze=1)
    assert clone(clf).get_params() == clf.get_params()
    grid = GridSearchCV(make_pipeline(tiny()), {"finetuneclassifier__unfreeze": [0, 1],
                                                 "finetuneclassifier__learning_rate": [1e-3, 3e-3]}, cv=2)
    grid.fit(paths, labels)
    assert len(grid.cv_results_["params"]) == 4


def test_init_stores_parameters_only():
    clf = FineTuneClassifier(unfreeze="not-validated-yet", epochs=-5)
    assert clf.get_params()["unfreeze"] == "not-validated-yet"
    with pytest.raises(ValueError):
        clf.fit(["a.jpg", "b.jpg"], ["x", "y"])


def test_validation_lists_every_bad_image(data, tmp_path):
    from skltransfer.training import evaluate

    paths, labels = data
    clf = tiny().fit(paths, labels)
    bad = [str(tmp_path / "gone.jpg"), str(tmp_path / "empty.jpg")]
    (tmp_path / "empty.jpg").write_bytes(b"")
    items = paths[:3] + [bad[0]] + paths[3:12] + [bad[1]]  # the bad ones in different batches
    targets = np.zeros(len(items), dtype=int)
    with pytest.raises(ImageLoadError) as info:
        evaluate(clf.model_, items, targets, clf.preprocessing_, torch.nn.CrossEntropyLoss(), 4,
                 torch.device("cpu"))
    assert [f.index for f in info.value.failures] == [3, 13]


def test_biases_and_norm_weights_are_not_decayed():
    from skltransfer.backbones import load_classifier
    from skltransfer.training import TrainingPlan, _param_groups, layer_groups

    model, _, classifier = load_classifier(TINY, None, 3)
    groups = layer_groups(model, classifier)
    param_groups = _param_groups(model, classifier, groups,
                                 TrainingPlan.from_estimator(FineTuneClassifier(weight_decay=0.05), CPU))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in param_groups:
        for p in group["params"]:
            one_d = p.ndim <= 1 or names[id(p)].endswith(".bias")
            assert group["weight_decay"] == (0.0 if one_d else 0.05), names[id(p)]
    assert sum(len(g["params"]) for g in param_groups) == len(names)  # every parameter, once
    assert param_groups[0]["name"] == "head" and param_groups[0]["weight_decay"] == 0.05


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_then_schedule_keeps_each_groups_own_peak_rate(schedule):
    from skltransfer.training import TrainingPlan, _schedule

    head, stage = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [head], "lr": 1e-3}, {"params": [stage], "lr": 1e-4}])
    plan = TrainingPlan.from_estimator(FineTuneClassifier(schedule=schedule, warmup_epochs=1.0), CPU)
    scheduler = _schedule(optimizer, plan, steps_per_epoch=4, epochs=3)
    rates = []
    for _ in range(12):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    rates = np.array(rates)
    np.testing.assert_allclose(rates[:, 1] * 10, rates[:, 0])  # backbone_lr_ratio holds at every step
    np.testing.assert_allclose(rates[:4, 0], [2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up to the peak
    if schedule == "cosine":
        assert np.all(np.diff(rates[4:, 0]) < 0) and rates[-1, 0] < 0.05 * 1e-3  # cosine down towards 0
    else:
        np.testing.assert_allclose(rates[3:, 0], 1e-3)


def _blobs(n: int = 40):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
    y = np.array(["a", "b"] * (n // 2))
    X[y == "a"] //= 3
    return X, y


def test_the_head_starts_as_the_readme_pipelines_linear_probe():
    from sklearn.linear_model import LogisticRegression

    from skltransfer import PretrainedFeatures

    X, y = _blobs()
    clf = tiny(epochs=0, early_stopping=False, random_state=5).fit(X, y)
    frozen = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None), LogisticRegression(max_iter=1000))
    np.testing.assert_allclose(clf.predict_proba(X), frozen.fit(X, y).predict_proba(X), atol=1e-5)
    assert clf.history_[0]["phase"] == "probe" and clf.history_[0]["epoch"] == 0


def test_input_size_is_the_size_it_trains_probes_and_predicts_at(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from skltransfer import PretrainedFeatures, load, save

    X, y = _blobs()
    clf = tiny(epochs=0, early_stopping=False, random_state=5, input_size=64).fit(X, y)
    assert clf.preprocessing_.input_size == (64, 64)
    # The probe is the frozen pipeline at that same size, not at the weights' own.
    frozen = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None, input_size=64),
                           LogisticRegression(max_iter=1000))
    np.testing.assert_allclose(clf.predict_proba(X), frozen.fit(X, y).predict_proba(X), atol=1e-5)
    trained = tiny(epochs=1, early_stopping=False, input_size=64).fit(X, y)
    save(trained, tmp_path / "m.skops")
    loaded = load(tmp_path / "m.skops")
    assert loaded.preprocessing_.input_size == (64, 64)
    np.testing.assert_array_equal(loaded.predict_proba(X), trained.predict_proba(X))
    with pytest.raises(ValueError, match="input_size"):
        tiny(input_size=8).fit(X, y)


def test_when_training_does_not_win_clearly_the_result_is_the_frozen_pipeline():
    from sklearn.linear_model import LogisticRegression

    from skltransfer import PretrainedFeatures

    X, y = _blobs()
    # A learning rate too small to change anything: no epoch beats the probe, so the probe is
    # kept and refitted on every image, as the README pipeline is.
    clf = tiny(epochs=2, early_stopping=True, validation_fraction=0.5, learning_rate=1e-12).fit(X, y)
    assert clf.best_epoch_ == 0 and clf.history_[0].get("best") and clf.history_[0].get("refitted")
    assert _final(clf.history_) is clf.history_[0] and clf.history_[0]["validated"] is False
    assert [h["epoch"] for h in clf.history_] == [0, 1, 2]
    assert all("valid_accuracy" in h for h in clf.history_)
    frozen = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None), LogisticRegression(max_iter=1000))
    np.testing.assert_allclose(clf.predict_proba(X), frozen.fit(X, y).predict_proba(X), atol=1e-5)


def test_a_validation_split_is_made_only_when_it_can_choose():
    X, y = _blobs(100)  # 20 validation images at validation_fraction=0.2: enough
    assert tiny(epochs=1).fit(X, y).best_epoch_ in (0, 1)
    X, y = _blobs(94)  # 19 validation images (0.2 x 94, rounded up): too few, every image trains
    clf = tiny(epochs=1).fit(X, y)
    assert clf.best_epoch_ is None and "valid_accuracy" not in clf.history_[-1]
    with pytest.raises(ValueError):  # asked for, impossible: one image of class "c"
        tiny(early_stopping=True).fit(X[:9], np.array(["a", "b"] * 4 + ["c"]))


@pytest.mark.parametrize(
    "won, lost, expected",
    [(1, 0, "start"), (2, 0, "trained"), (5, 3, "start"), (10, 3, "trained"), (0, 0, "start"), (3, 5, "start")],
)
def test_training_must_beat_the_probe_clearly(won, lost, expected):
    from skltransfer.training import _choose

    start = np.array([False] * won + [True] * lost + [True] * 20)
    trained = np.array([True] * won + [False] * lost + [True] * 20)
    candidates = {"start": ((0.5,), {}, 0, start), "trained": ((0.6,), {}, 3, trained)}
    assert _choose(candidates) is candidates[expected]


def test_augmentation_presets_mirror_only_where_asked():
    from skltransfer.preprocessing import Preprocessing
    from skltransfer.training import training_augmentation

    p = Preprocessing((16, 16), 1.0, "center", "bilinear", (0.5,) * 3, (0.5,) * 3)
    half = torch.zeros(3, 16, 16, dtype=torch.uint8)
    half[:, :, :8] = 255  # bright on the left
    torch.manual_seed(0)
    for preset, image, may_mirror in [("noflip", half, False), ("flip", half, True),
                                      ("auto", half.repeat(1, 2, 2), True), ("auto", half[:, :12, :12], False)]:
        augment = training_augmentation(p, preset)
        outs = [augment(image) for _ in range(40)]
        assert all(o.shape == (3, 16, 16) for o in outs)
        mirrored = [o[:, :, :4].float().mean() < o[:, :, -4:].float().mean() for o in outs]
        assert any(mirrored) == may_mirror, preset
    assert training_augmentation(p, "none") == p.resize_crop
    with pytest.raises(ValueError, match="augment"):
        training_augmentation(p, "sideways")


def test_tta_flip_predicts_an_image_and_its_mirror_alike(data):
    paths, labels = data
    clf = tiny(tta="flip", engine="torch").fit(paths, labels)
    X = np.stack([np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB")) for p in paths[:4]])
    X[:, :, : X.shape[2] // 2] //= 2  # not mirror-symmetric
    np.testing.assert_allclose(clf.predict_proba(X), clf.predict_proba(X[:, :, ::-1].copy()), atol=1e-5)
    plain = clone(clf).set_params(tta=None).fit(paths, labels)
    assert not np.allclose(plain.predict_proba(X), plain.predict_proba(X[:, :, ::-1].copy()), atol=1e-5)


class _LeftHalf(nn.Module):
    """Logits from the brightness of the left half only (class 1), or of each half (class 0 and 1)."""

    def __init__(self, each_half: bool):
        super().__init__()
        self.each_half = each_half

    def forward(self, x):
        half = x.shape[-1] // 2
        left, right = x[..., :half].mean(dim=(1, 2, 3)), x[..., half:].mean(dim=(1, 2, 3))
        zero = 4 * right if self.each_half else torch.full_like(left, -1.0)
        return torch.stack([zero, 4 * left], dim=1)


def _half_bright(sides: list[str]) -> np.ndarray:
    X = np.zeros((len(sides), 32, 32, 3), dtype=np.uint8)
    for image, side in zip(X, sides):
        if side != "dark":
            image[:, slice(0, 16) if side == "left" else slice(16, 32)] = 255
    return X


@pytest.mark.parametrize("mirror_is_same_class", [True, False])
def test_tta_auto_mirrors_only_where_the_validation_split_scores_mirrors_better(mirror_is_same_class):
    from skltransfer.backbones import load_classifier
    from skltransfer.training import TrainingPlan, choose_tta, evaluate

    if mirror_is_same_class:  # bright on either side is class 1; a left-half detector misses the right-bright ones
        sides, y = ["dark"] * 10 + ["left"] * 5 + ["right"] * 5, np.repeat([0, 1], 10)
    else:  # bright left is class 1, bright right class 0: the mirror swaps the classes
        sides, y = ["right"] * 10 + ["left"] * 10, np.repeat([0, 1], 10)
    X = list(_half_bright(sides))
    _, pre, _ = load_classifier(TINY, None, 2)
    model = _LeftHalf(each_half=not mirror_is_same_class)
    plan = TrainingPlan.from_estimator(FineTuneClassifier(batch_size=8), CPU)
    row = {"epoch": 3, **evaluate(model, X, y, pre, None, 8, CPU)}
    chosen = choose_tta(model, row, (X, y), pre, plan, CPU)
    if mirror_is_same_class:
        assert (row["valid_accuracy"], row["valid_accuracy_flip"]) == (0.75, 1.0) and chosen == "flip"
    else:
        assert (row["valid_accuracy"], row["valid_accuracy_flip"]) == (1.0, 0.5) and chosen is None
    assert row["tta"] == chosen


def test_tta_auto_records_its_choice_and_predictions_follow_it(monkeypatch, tmp_path):
    from skltransfer import load, save, training

    X, y = _blobs()
    for choice in ("flip", None):
        def fake_choice(model, row, *args, choice=choice):
            row["tta"] = choice
            return choice

        monkeypatch.setattr(training, "choose_tta", fake_choice)
        clf = tiny(tta="auto", early_stopping=True, engine="torch").fit(X, y)
        assert clf.tta_ == choice and clf.history_[clf.best_epoch_]["tta"] == choice
        as_chosen = clone(clf).set_params(tta=choice).fit(X, y)
        assert as_chosen.tta_ == choice
        np.testing.assert_array_equal(clf.predict_proba(X), as_chosen.predict_proba(X))
        path = tmp_path / f"model-{choice}.skops"
        save(clf, path)
        assert load(path).tta_ == choice
    # Without a split nothing can say whether mirrors are the same class: no mirroring.
    unsplit = tiny(tta="auto", early_stopping=False).fit(X, y)
    assert unsplit.tta_ is None and not any("tta" in h for h in unsplit.history_)
    assert tiny(tta="flip").fit(X, y).tta_ == "flip"
    # A model pickled before tta_ existed predicts with the mode its tta parameter named.
    state = clf.__getstate__()
    del state["tta_"]
    old = FineTuneClassifier.__new__(FineTuneClassifier)
    old.__setstate__({**state, "tta": "flip"})
    assert old.tta_ == "flip"


def test_16_bit_training_precisions_the_cpu_cannot_run_are_refused(data):
    with pytest.raises(ValueError, match="float16 is for GPUs"):
        tiny(precision="float16", device="cpu").fit(*data)


def test_stopping_waits_for_training_to_stop_improving_not_for_it_to_pass_the_probe(monkeypatch):
    import skltransfer.training as training
    from skltransfer.backbones import load_classifier

    # A dip below the probe in the first epochs must not stop training: count the epochs run
    # when every trained state is worse than the start but keeps improving.
    accuracies = iter([0.9, 0.5, 0.6, 0.7, 0.8, 0.85])

    def fake_evaluate(*args, per_image=False, **kwargs):
        accuracy = next(accuracies)
        return {"valid_loss": 1.0 - accuracy, "valid_accuracy": accuracy}, np.arange(20) < round(accuracy * 20)

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    X, y = _blobs(24)
    model, pre, head = load_classifier(TINY, None, 2)
    plan = training.TrainingPlan.from_estimator(
        FineTuneClassifier(epochs=5, n_iter_no_change=1, batch_size=8, warmup_epochs=0, refit_epochs="kept"), CPU)
    targets = (y == "b").astype(int)
    history = training.train_classifier(model, head, "all", list(X), targets, pre, None, plan, torch.device("cpu"),
                                        validation=(list(X[:4]), targets[:4]), start={"epoch": 0, "phase": "probe"})
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4, 5]  # never stopped: training kept improving
    assert history[0].get("best")  # and the probe, better than all of it, was kept


def test_input_size_auto_trains_small_images_smaller_and_photos_at_the_weights_size(tmp_path, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    import skltransfer.preprocessing
    from skltransfer import PretrainedFeatures, load, save

    # The test backbone's own size is 160, the size "auto" picks for small images with Lite0's 224;
    # a smaller pick shows the rule at work here.
    monkeypatch.setattr(skltransfer.preprocessing, "SMALL_IMAGE_INPUT", 96)
    X, y = _blobs()  # 48 x 48 px: small
    clf = tiny(epochs=0, early_stopping=False, random_state=5, input_size="auto").fit(X, y)
    assert clf.preprocessing_.input_size == (96, 96)
    frozen = make_pipeline(PretrainedFeatures(TINY, weights=None, cache=None, input_size=96),
                           LogisticRegression(max_iter=1000))
    np.testing.assert_allclose(clf.predict_proba(X), frozen.fit(X, y).predict_proba(X), atol=1e-5)
    save(clf, tmp_path / "m.skops")
    assert load(tmp_path / "m.skops").preprocessing_.input_size == (96, 96)
    photos = np.repeat(np.repeat(X, 2, axis=1), 2, axis=2)  # 96 x 96 px: not small
    assert tiny(epochs=0, early_stopping=False, input_size="auto").fit(photos, y).preprocessing_.input_size == (160, 160)
