"""Options that make features transfer: crop policy, several layers, GeM, flip TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from _support import TINY, make_image
from skltransfer import PretrainedFeatures, load_backbone, load_image_folder
from skltransfer.pooling import pool_map
from skltransfer.preprocessing import Preprocessing


def features(**params) -> PretrainedFeatures:
    return PretrainedFeatures(**{"backbone": TINY, "weights": None, "cache": None, **params})


PRE = Preprocessing((64, 64), 0.875, "center", "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_center_crop_cuts_the_border_and_none_keeps_it():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, :, 0] = 255  # a 1 px white stripe at the left edge: inside the 12.5 % centre crop cuts
    assert PRE.with_crop("center").resize_crop(image)[:, :, 0].float().mean() < 10
    assert PRE.with_crop("none").resize_crop(image)[:, :, 0].float().mean() > 150


def test_auto_crop_spares_small_images_and_crops_photos():
    small = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    photo = torch.randint(0, 255, (3, 300, 400), dtype=torch.uint8)
    auto = PRE.with_crop("auto")
    assert torch.equal(auto.resize_crop(small), PRE.with_crop("none").resize_crop(small))
    assert torch.equal(auto.resize_crop(photo), PRE.with_crop("center").resize_crop(photo))


def test_pad_keeps_the_aspect_and_pads_with_the_mean_colour():
    wide = torch.full((3, 20, 80), 200, dtype=torch.uint8)
    out = PRE.with_crop("pad").resize_crop(wide)
    assert out.shape == (3, 64, 64)
    assert (out[:, 0, :] == 128).all() and (out[:, 32, :] == 200).all()  # 80 -> 64 wide, 16 high


def test_all_layers_end_with_the_default_final_features(image_folder):
    paths, _ = load_image_folder(image_folder)
    default = features().fit(paths)
    every = features(layers="all").fit(paths)
    assert [name for name, _ in every.feature_groups_][-1] == "final"
    final = every.transform(paths)[:, -default.n_features_out_:]
    np.testing.assert_allclose(final, default.transform(paths), rtol=1e-4, atol=1e-5)


def test_layer_selection_widths_and_feature_names(image_folder):
    paths, _ = load_image_folder(image_folder)
    f = features(layers=[-3, -2, -1]).fit(paths)
    widths = dict(f.feature_groups_)
    assert list(widths) == ["stage3", "stage4", "final"]
    assert f.transform(paths[:2]).shape == (2, sum(widths.values()))
    names = f.get_feature_names_out()
    assert names[0] == "pretrainedfeatures_stage3_0" and names[-1] == f"pretrainedfeatures_final_{widths['final'] - 1}"


def test_gem_is_the_generalised_mean_with_p_3():
    x = torch.rand(2, 5, 4, 3) + 0.1
    expected = x.pow(3).mean((2, 3)).pow(1 / 3)
    torch.testing.assert_close(pool_map(x, "gem"), expected)
    assert features(pooling="gem").fit([make_image(0)]).transform([make_image(0)]).shape == (1, 256)


def test_flip_tta_is_invariant_to_mirroring_the_image():
    image = make_image(seed=3, size=(40, 40))
    f = features(tta="flip").fit([image])
    np.testing.assert_allclose(f.transform([image]), f.transform([image[:, ::-1].copy()]), atol=1e-5)
    plain = features().fit([image])
    assert not np.allclose(plain.transform([image]), plain.transform([image[:, ::-1].copy()]), atol=1e-5)


def test_every_option_is_part_of_the_cache_key(image_folder, tmp_path):
    paths, _ = load_image_folder(image_folder)
    seen = []
    # (these test images are smaller than the input: crop="auto" means "none" for them)
    for params in [{}, {"crop": "center"}, {"layers": [-2, -1]}, {"tta": "flip"}, {"pooling": "gem"}]:
        f = features(cache=tmp_path / "c", **params).fit(paths)
        out = f.transform(paths)
        assert f.cache_info_.hits == 0, params
        assert not any(np.array_equal(out, other) for other in seen), params
        seen.append(out)


def test_gridsearch_over_the_options(image_folder, tmp_path):
    paths, labels = load_image_folder(image_folder)
    pipe = Pipeline([("features", features(cache=tmp_path / "c")), ("clf", LogisticRegression(max_iter=500))])
    grid = GridSearchCV(pipe, {"features__crop": ["center", "none"], "features__layers": ["final", [-2, -1]],
                               "features__tta": [None, "flip"], "clf__C": [0.1, 1.0]}, cv=2)
    grid.fit(paths, labels)
    assert grid.best_score_ > 0.8 and len(grid.cv_results_["params"]) == 16


def test_unsupported_combinations_are_clear_errors():
    with pytest.raises(ValueError, match="out of range: this backbone has 6 feature maps"):
        load_backbone(TINY, weights=None, layers=[-9, -1])
    with pytest.raises(ValueError, match="layers needs a timm backbone"):
        load_backbone("torchvision:mobilenet_v3_small", weights=None, layers=[-2, -1])
    with pytest.raises(ValueError, match="pooling must be 'avg'"):
        load_backbone("torchvision:mobilenet_v3_small", weights=None, pooling="gem")
    with pytest.raises(ValueError, match="distinct"):
        load_backbone(TINY, weights=None, layers=[-1, -1])
