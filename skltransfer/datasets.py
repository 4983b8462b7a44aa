"""Loading image folders and splitting them stably.

``root/<class>/<image>`` is the layout of torchvision's ``ImageFolder`` and
of the TensorFlow retraining tutorials. Splits are decided by a hash of each
file's name (as TensorFlow's ``retrain.py`` does), so adding images to a
folder never moves an existing image from train to test.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "iter_image_files", "load_image_folder", "stable_train_test_split"]

#: File endings read as images (compared case-insensitively).
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def iter_image_files(
    folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> Iterator[str]:
    """Image files under ``folder``, recursively, in sorted order; hidden files and folders skipped."""
    wanted = tuple(e.lower() for e in extensions)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if not _is_hidden(name) and name.lower().endswith(wanted):
                yield os.path.join(dirpath, name)


def load_image_folder(
    root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], np.ndarray]:
    """Paths and labels from a class-per-subfolder tree.

    Every subfolder of ``root`` is a class named after it; its images (in
    nested folders too) are that class's samples. Hidden files and folders
    and files that are not images by their ending are skipped. The order is
    deterministic: classes sorted by name, then files by relative path.

    Parameters
    ----------
    root : str or PathLike
        Folder holding one subfolder per class.
    extensions : sequence of str
        File endings counted as images.

    Returns
    -------
    paths : list of str
        Image paths.
    labels : ndarray of str
        The class (subfolder name) of each path.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist or is not a folder.
    ValueError
        If ``root`` has no class subfolders (a flat folder of images, or an
        empty one), or no images at all.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for cls in ("cat", "dog"):
    ...     (root / cls).mkdir()
    ...     Image.new("RGB", (8, 8)).save(root / cls / "a.png")
    >>> paths, labels = load_image_folder(root)
    >>> labels.tolist()
    ['cat', 'dog']
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    wanted = tuple(e.lower() for e in extensions)
    classes = sorted(
        p.name for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name)
    )
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in wanted]
    if not classes:
        if loose:
            raise ValueError(
                f"{root} holds {len(loose)} images but no class subfolders; expected "
                f"{root}/<class>/<image> (for example {root}/cats/{loose[0]})"
            )
        raise ValueError(f"{root} is empty: expected one subfolder of images per class")
    paths: list[str] = []
    labels: list[str] = []
    empty: list[str] = []
    for cls in classes:
        found = list(iter_image_files(root / cls, extensions))
        if not found:
            empty.append(cls)
        paths.extend(found)
        labels.extend([cls] * len(found))
    if not paths:
        raise ValueError(f"no images found under {root} (looked for {', '.join(wanted)})")
    if empty:
        warnings.warn(
            f"class folders with no images were skipped: {', '.join(empty)}", UserWarning, stacklevel=2
        )
    return paths, np.asarray(labels)


def stable_train_test_split(
    paths: Sequence[str | os.PathLike],
    *arrays,
    test_size: float = 0.2,
    salt: str = "",
):
    """Split by a hash of each file name: stable when images are added.

    An image lands in the test set when the sha1 of its file name (not its
    folder), read as a number in [0, 1), is below ``test_size``. The same
    file name always lands on the same side, whatever else is in the folder.

    Parameters
    ----------
    paths : sequence of str or PathLike
        Image paths.
    *arrays : sequences of the same length
        Split alongside ``paths`` (labels, for instance).
    test_size : float
        Expected fraction of images in the test set, in (0, 1).
    salt : str
        Changes the split (for a different but equally stable draw).

    Returns
    -------
    list
        ``paths_train, paths_test`` then, for each array, its train and test
        parts (lists stay lists, arrays stay arrays), as in
        :func:`sklearn.model_selection.train_test_split`.

    Examples
    --------
    >>> train, test = stable_train_test_split(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], test_size=0.5)
    >>> sorted(train + test)
    ['a.jpg', 'b.jpg', 'c.jpg', 'd.jpg']
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    for array in arrays:
        if len(array) != len(paths):
            raise ValueError(
                f"all inputs must have the same length: {len(paths)} paths, {len(array)} values"
            )
    is_test = np.array([_hash_fraction(os.path.basename(os.fspath(p)), salt) < test_size for p in paths], dtype=bool)
    train_idx = np.flatnonzero(~is_test)
    test_idx = np.flatnonzero(is_test)
    result = []
    for values in (paths, *arrays):
        for idx in (train_idx, test_idx):
            if isinstance(values, np.ndarray):
                result.append(values[idx])
            elif hasattr(values, "iloc"):
                result.append(values.iloc[idx])
            else:
                result.append([values[i] for i in idx])
    return result


def _hash_fraction(name: str, salt: str) -> float:
    digest = hashlib.sha1(f"{salt}{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
