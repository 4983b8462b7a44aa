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


# -- example data: digits from scikit-learn, hymenoptera from a server ----------------------


def test_digits_are_written_as_class_folders_of_png_files(tmp_path):
    from skltransfer.datasets import write_digits_folder

    paths, labels = load_image_folder(write_digits_folder(tmp_path / "digits", max_images=30))
    assert len(paths) == 30 and sorted(set(labels)) == [str(d) for d in range(10)]
    from PIL import Image

    assert Image.open(paths[0]).size == (8, 8)


def _archive(tmp_path, corrupt: bool = False) -> bytes:
    import io
    import zipfile

    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for split in ("train", "val"):
            for cls in ("ants", "bees"):
                for i in range(2):
                    image = io.BytesIO()
                    Image.new("RGB", (12, 10), (200 if cls == "ants" else 20, 90, 40)).save(image, "JPEG")
                    zf.writestr(f"hymenoptera_data/{split}/{cls}/{i}.jpg", image.getvalue())
        zf.writestr("hymenoptera_data/../escape.txt", "outside")  # never written outside the folder
    data = buffer.getvalue()
    return data[:-40] if corrupt else data


@pytest.fixture
def server(tmp_path):
    """A local HTTP server: {path: bytes} to serve, and the list of paths asked for."""
    import http.server
    import threading

    files: dict[str, bytes] = {}
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files, asked
    httpd.shutdown()


def _remote(url: str, sha256):
    from skltransfer.datasets import HYMENOPTERA, RemoteArchive

    return RemoteArchive(url=url, sha256=sha256, folders=HYMENOPTERA.folders)


def test_fetch_downloads_checks_unpacks_once_and_then_reads_locally(tmp_path, server, monkeypatch):
    import hashlib

    from skltransfer import datasets

    base, files, asked = server
    files["/h.zip"] = _archive(tmp_path)
    monkeypatch.setattr(datasets, "HYMENOPTERA", _remote(base + "/h.zip", hashlib.sha256(files["/h.zip"]).hexdigest()))
    folder = datasets.fetch_hymenoptera(tmp_path / "home")
    assert folder == tmp_path / "home" / "hymenoptera"
    train, y_train = load_image_folder(folder / "train")
    test, y_test = load_image_folder(folder / "test")  # the archive's val/ is our test/
    assert len(train) == len(test) == 4 and sorted(set(y_train)) == ["ants", "bees"]
    assert not (tmp_path / "home" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert datasets.fetch_hymenoptera(tmp_path / "home") == folder and asked == ["/h.zip"]  # no second download
    monkeypatch.setenv(datasets.DATA_HOME_ENV, str(tmp_path / "home"))
    assert datasets.fetch_hymenoptera() == folder and len(asked) == 1


def test_a_wrong_checksum_keeps_nothing_and_says_both_digests(tmp_path, server, monkeypatch):
    from skltransfer import datasets

    base, files, _ = server
    files["/h.zip"] = _archive(tmp_path)
    monkeypatch.setattr(datasets, "HYMENOPTERA", _remote(base + "/h.zip", "0" * 64))
    with pytest.raises(datasets.DatasetUnavailableError, match="expected 0000"):
        datasets.fetch_hymenoptera(tmp_path / "home")
    assert list((tmp_path / "home").iterdir()) == []  # no partial data set, no temporary files


def test_an_unverified_checksum_accepts_the_layout_and_records_the_digest(tmp_path, server, monkeypatch):
    import hashlib

    from skltransfer import datasets

    base, files, _ = server
    files["/h.zip"] = _archive(tmp_path)
    monkeypatch.setattr(datasets, "HYMENOPTERA", _remote(base + "/h.zip", None))
    folder = datasets.fetch_hymenoptera(tmp_path / "home")
    assert (folder / "SHA256SUM").read_text().startswith(hashlib.sha256(files["/h.zip"]).hexdigest())
    files["/bad.zip"] = _archive(tmp_path, corrupt=True)
    monkeypatch.setattr(datasets, "HYMENOPTERA", _remote(base + "/bad.zip", None))
    with pytest.raises(datasets.DatasetUnavailableError, match="not a zip archive"):
        datasets.fetch_hymenoptera(tmp_path / "other")


def test_the_unpacked_photos_must_be_the_pinned_ones(tmp_path, server, monkeypatch):
    """content_sha256 pins the photos themselves; a placeholder that is not a photo is never unpacked."""
    import dataclasses
    import io
    import zipfile

    from skltransfer import datasets

    base, files, _ = server
    files["/h.zip"] = _archive(tmp_path)
    with zipfile.ZipFile(io.BytesIO(files["/h.zip"])) as zf, zipfile.ZipFile(tmp_path / "plus.zip", "w") as out:
        for member in zf.infolist():
            out.writestr(member, zf.read(member))
        out.writestr("hymenoptera_data/train/ants/imageNotFound.gif", b"GIF89a placeholder")
    files["/plus.zip"] = (tmp_path / "plus.zip").read_bytes()
    monkeypatch.setattr(datasets, "HYMENOPTERA", _remote(base + "/h.zip", None))
    pinned = datasets.content_digest(datasets.fetch_hymenoptera(tmp_path / "reference"))
    remote = dataclasses.replace(_remote(base + "/plus.zip", None), content_sha256=pinned, suffixes=(".jpg",))
    monkeypatch.setattr(datasets, "HYMENOPTERA", remote)
    folder = datasets.fetch_hymenoptera(tmp_path / "home")  # the GIF is left out, so the photos match
    assert not (folder / "train" / "ants" / "imageNotFound.gif").exists() and len(load_image_folder(folder / "train")[0]) == 4
    monkeypatch.setattr(datasets, "HYMENOPTERA", dataclasses.replace(remote, suffixes=None))
    with pytest.raises(datasets.DatasetUnavailableError, match=f"expected {pinned}"):
        datasets.fetch_hymenoptera(tmp_path / "other")  # with the GIF the files differ: refused
    assert list((tmp_path / "other").iterdir()) == []


def test_the_pinned_hymenoptera_digest_is_that_of_the_tutorial_photos():
    from skltransfer import datasets

    assert datasets.content_digest(requires_shared_data("hymenoptera")) == datasets.HYMENOPTERA.content_sha256


def test_offline_or_download_false_names_the_folder_to_use_instead(tmp_path, server, monkeypatch):
    from skltransfer import datasets

    base, _, _ = server
    with pytest.raises(datasets.DatasetUnavailableError, match="download=False") as info:
        datasets.fetch_hymenoptera(tmp_path / "home", download=False)
    assert str(tmp_path / "home" / "hymenoptera") in str(info.value)
    monkeypatch.setattr(datasets, "HYMENOPTERA", _remote(base + "/missing.zip", None))  # 404
    with pytest.raises(datasets.DatasetUnavailableError, match="could not download") as info:
        datasets.fetch_hymenoptera(tmp_path / "home")
    assert "pass your own image folder" in str(info.value)
    monkeypatch.setattr(datasets, "HYMENOPTERA", _remote("http://127.0.0.1:9/h.zip", None))  # nothing listens
    with pytest.raises(datasets.DatasetUnavailableError, match="could not download"):
        datasets.fetch_hymenoptera(tmp_path / "home", timeout=5)
