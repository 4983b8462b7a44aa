"""Loading image folders, splitting them stably, and example data.

``root/<class>/<image>`` is the layout of torchvision's ``ImageFolder`` and
of the TensorFlow retraining tutorials. Splits are decided by a hash of each
file's name (as TensorFlow's ``retrain.py`` does), so adding images to a
folder never moves an existing image from train to test.

Example data: :func:`write_digits_folder` (installed with scikit-learn) and
:func:`fetch_hymenoptera` (downloaded once, checked, kept in a local folder).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATA_HOME_ENV", "IMAGE_EXTENSIONS", "DatasetUnavailableError", "content_digest", "data_home", "fetch_hymenoptera",
    "iter_image_files", "load_image_folder", "stable_train_test_split", "write_digits_folder",
]

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


def write_digits_folder(folder: str | os.PathLike, max_images: int | None = None) -> Path:
    """scikit-learn's bundled handwritten digits, written out as PNG files in class folders.

    1,797 grey 8 x 8 images (``folder/<digit>/digit_NNNN.png``), installed
    with scikit-learn, so examples and ``skltransfer demo`` run with no
    download. Small images far from ImageNet's photos: frozen features do
    well, fine-tuning better.

    Parameters
    ----------
    folder : str or PathLike
        Where to write (created; existing files are overwritten).
    max_images : int, optional
        At most this many, every class equally, in the data set's own order.

    Returns
    -------
    Path
        ``folder``, ready for :func:`load_image_folder`.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     paths, labels = load_image_folder(write_digits_folder(tmp, max_images=20))
    >>> len(paths), sorted(set(labels.tolist()))[:3]
    (20, ['0', '1', '2'])
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = Path(folder)
    digits = load_digits()
    order = np.arange(len(digits.target))
    if max_images is not None and max_images < len(order):
        per_class = max(1, max_images // 10)
        order = np.concatenate([np.flatnonzero(digits.target == c)[:per_class] for c in range(10)])
    for i in order:
        label_dir = folder / str(digits.target[i])
        label_dir.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(label_dir / f"digit_{i:04d}.png")
    return folder


# -- downloaded example data ------------------------------------------------------------

#: Environment variable naming the folder example data sets are kept in.
DATA_HOME_ENV = "SKLTRANSFER_DATA"


class DatasetUnavailableError(OSError):
    """An example data set is not in the local folder and could not be downloaded."""


@dataclass(frozen=True)
class RemoteArchive:
    """Where a data set's archive is downloaded from, and what it must hash to.

    ``sha256`` is the archive's digest; ``content_sha256`` the digest of the
    files unpacked from it (:func:`content_digest`), which can be pinned from
    a copy of the data when the archive itself cannot be fetched. A download
    must match every digest that is set; with neither set it is accepted on
    its layout alone. The archive's digest is recorded beside the data.
    """

    url: str
    sha256: str | None
    # archive member folder -> the data set's folder
    folders: tuple[tuple[str, str], ...]
    content_sha256: str | None = None
    # only members with these endings are unpacked (None: all)
    suffixes: tuple[str, ...] | None = None


HYMENOPTERA = RemoteArchive(
    # The PyTorch transfer-learning tutorial's archive (ants and bees; its val/ is our test/).
    url="https://download.pytorch.org/tutorial/hymenoptera_data.zip",
    # The archive could not be fetched where this was written (no network), so its own digest
    # is not pinned; its 397 photos are: content_sha256 is content_digest() of a copy of the
    # tutorial's data (244 train, 153 test JPEGs). The archive's one placeholder GIF
    # (train/ants/imageNotFound.gif, not a photo) is not unpacked.
    sha256=None,
    folders=(("hymenoptera_data/train/", "train/"), ("hymenoptera_data/val/", "test/")),
    content_sha256="a045c354a63d3966a561b1093e964d327857780fd01b0cb1f8b3cae77b3e0ec3",
    suffixes=(".jpg", ".jpeg"),
)


def content_digest(folder: str | os.PathLike) -> str:
    """sha256 over every file under ``folder`` (sorted relative path and the file's own sha256).

    What ``RemoteArchive.content_sha256`` pins: the same files give the same
    digest wherever they are unpacked. ``SHA256SUM`` (written by the fetch) is
    left out.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.txt").write_text("ants")
    >>> content_digest(folder)[:12]
    'fa94877c533a'
    """
    root = Path(folder)
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUM"):
        lines.append(f"{path.relative_to(root).as_posix()}\t{hashlib.sha256(path.read_bytes()).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def data_home(folder: str | os.PathLike | None = None) -> Path:
    """Where example data sets are kept: ``folder``, else ``$SKLTRANSFER_DATA``, else ``~/.cache/skltransfer/datasets``.

    Examples
    --------
    >>> data_home("/data/sets")
    PosixPath('/data/sets')
    """
    if folder is not None:
        return Path(folder).expanduser()
    if os.environ.get(DATA_HOME_ENV):
        return Path(os.environ[DATA_HOME_ENV]).expanduser()
    from .cache import user_cache_home

    return user_cache_home() / "datasets"


def fetch_hymenoptera(folder: str | os.PathLike | None = None, *, download: bool = True,
                      timeout: float = 60.0) -> Path:
    """The ants-vs-bees photos of PyTorch's transfer-learning tutorial: ``train/`` and ``test/`` class folders.

    397 JPEG photos (244 train, 153 test), 2 classes. Kept in
    ``data_home(folder) / "hymenoptera"``: a folder that already holds
    ``train/`` and ``test/`` is used as it is (so a copy you have is never
    downloaded again); otherwise the tutorial's archive (47 MB) is
    downloaded and its photos unpacked there, checked against a pinned digest.

    Parameters
    ----------
    folder : path, optional
        The data home (see :func:`data_home`).
    download : bool, default=True
        False: never touch the network; an error if the data is not there.
    timeout : float, default=60
        Seconds to wait for the server.

    Returns
    -------
    Path
        The folder holding ``train/`` and ``test/``; pass each to :func:`load_image_folder`.

    Raises
    ------
    DatasetUnavailableError
        Not there and not downloadable (offline, say): the message names the
        folder to put a copy in, or to pass instead.
    """
    return _fetch("hymenoptera", HYMENOPTERA, data_home(folder), download, timeout)


def _fetch(name: str, remote: RemoteArchive, home: Path, download: bool, timeout: float) -> Path:
    import shutil
    import tempfile
    import urllib.request
    import zipfile

    target = home / name
    wanted = [dest.rstrip("/") for _, dest in remote.folders]
    if all((target / d).is_dir() for d in wanted):
        return target
    how_to = (f"put a copy in {target} (with {' and '.join(d + '/' for d in wanted)} class folders), "
              f"set ${DATA_HOME_ENV} to a folder holding {name}/, or pass your own image folder instead")
    if not download:
        raise DatasetUnavailableError(f"{name} is not in {target} and download=False: {how_to}")
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home, prefix=f".{name}-") as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            with urllib.request.urlopen(remote.url, timeout=timeout) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise DatasetUnavailableError(f"could not download {name} from {remote.url} ({exc}): {how_to}") from exc
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if remote.sha256 is not None and digest != remote.sha256:
            raise DatasetUnavailableError(
                f"{remote.url} does not have the expected checksum (sha256 {digest}, expected {remote.sha256}); "
                f"nothing was kept. {how_to}"
            )
        staged = Path(tmp) / name
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in zf.infolist():
                    dest = next((d + member.filename[len(src):] for src, d in remote.folders
                                 if member.filename.startswith(src)), None)
                    if dest is None or member.is_dir() or ".." in Path(dest).parts:
                        continue
                    if remote.suffixes is not None and not dest.lower().endswith(remote.suffixes):
                        continue
                    path = staged / dest
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src_file, open(path, "wb") as out:
                        shutil.copyfileobj(src_file, out)
        except zipfile.BadZipFile as exc:
            raise DatasetUnavailableError(f"{remote.url} is not a zip archive ({exc}): {how_to}") from exc
        if not all((staged / d).is_dir() for d in wanted):
            raise DatasetUnavailableError(f"{remote.url} does not hold {', '.join(wanted)}: {how_to}")
        unpacked = content_digest(staged)
        if remote.content_sha256 is not None and unpacked != remote.content_sha256:
            raise DatasetUnavailableError(
                f"the files unpacked from {remote.url} are not the expected ones (content sha256 {unpacked}, "
                f"expected {remote.content_sha256}); nothing was kept. {how_to}"
            )
        (staged / "SHA256SUM").write_text(f"{digest}  {remote.url}\n")
        if target.exists():  # an incomplete earlier copy
            shutil.rmtree(target)
        staged.rename(target)  # complete or absent: never half there
    return target
