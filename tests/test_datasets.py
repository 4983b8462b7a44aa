"""Folder loading and stable splits."""

from __future__ import annotations

import numpy as np
import pytest

from _support import requires_shared_data
from skltransfer import load_image_folder, stable_train_test_split


def test_classes_and_files_come_in_a_deterministic_order(image_folder):
    (image_folder / "red" / "nested").mkdir()
    (image_folder / "red" / "nested" / "z.JPG").write_bytes((image_folder / "red" / "red_1.jpg").read_bytes())
    paths, labels = load_image_folder(image_folder)
    assert list(dict.fromkeys(labels)) == ["blue", "red"]
    assert paths == load_image_folder(image_folder)[0]
    assert any(p.endswith("nested/z.JPG") for p in paths)  # upper-case endings, nested folders
    assert len(paths) == 17 and labels.dtype.kind == "U"


def test_hidden_and_non_image_files_are_skipped(image_folder):
    (image_folder / "red" / ".DS_Store").write_bytes(b"junk")
    (image_folder / "red" / "notes.txt").write_text("not an image")
    (image_folder / ".cache").mkdir()
    (image_folder / ".cache" / "x.jpg").write_bytes(b"junk")
    paths, labels = load_image_folder(image_folder)
    assert len(paths) == 16 and set(labels) == {"red", "blue"}


def test_flat_empty_and_missing_folders_are_clear_errors(tmp_path, image_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes((image_folder / "red" / "red_1.jpg").read_bytes())
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(flat)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_image_folder(empty)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_folder(tmp_path / "nowhere")


def test_an_empty_class_folder_is_skipped_with_a_warning(image_folder):
    (image_folder / "green").mkdir()
    with pytest.warns(UserWarning, match="green"):
        _, labels = load_image_folder(image_folder)
    assert "green" not in set(labels)


def test_stable_split_does_not_move_images_when_more_arrive():
    old = [f"class/img_{i}.jpg" for i in range(500)]
    new = old + [f"class/new_{i}.jpg" for i in range(300)]
    _, old_test = stable_train_test_split(old, test_size=0.2)
    _, new_test = stable_train_test_split(new, test_size=0.2)
    assert set(old_test) == set(new_test) & set(old)
    assert 0.15 < len(old_test) / len(old) < 0.25


def test_stable_split_carries_labels_along_and_keeps_types():
    paths = [f"d/{i}.jpg" for i in range(100)]
    labels = np.arange(100)
    p_train, p_test, y_train, y_test = stable_train_test_split(paths, labels, test_size=0.3)
    assert isinstance(p_train, list) and isinstance(y_train, np.ndarray)
    assert [int(p.split("/")[1][:-4]) for p in p_test] == list(y_test)
    with pytest.raises(ValueError, match="same length"):
        stable_train_test_split(paths, labels[:5])


def test_real_folder_with_a_space_in_a_file_name():
    root = requires_shared_data("hymenoptera")
    paths, labels = load_image_folder(root / "train")
    assert len(paths) == 244 and set(labels) == {"ants", "bees"}
    assert any(p.endswith("ant photos.jpg") for p in paths)
