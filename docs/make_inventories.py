"""Write the small intersphinx inventories in docs/_inventories, offline.

The documentation links names of scikit-learn, PyTorch, torchvision, NumPy and Python into
their own sites. Sphinx finds those links in each site's ``objects.inv``, which cannot be
downloaded where the docs are built (no network), so this script writes small ones holding
the names our docs use, each at the address its site gives it (the sites' URL patterns, as of
November 2026: scikit-learn ``modules/generated/<name>.html``, PyTorch ``generated/<name>.html``,
torchvision ``generated/<name>.html``, NumPy ``reference/generated/<name>.html``, Python's by
module page). A name missing here makes the build fail (nitpicky), which is the point: add it
below and rerun.

    python docs/make_inventories.py
"""

from __future__ import annotations

from pathlib import Path

import sphobjinv as soi

HERE = Path(__file__).resolve().parent / "_inventories"

SITES = {
    "sklearn": ("scikit-learn", "1.9", "modules/generated/{name}.html#$", {
        "class": ["sklearn.base.BaseEstimator", "sklearn.base.ClassifierMixin", "sklearn.base.TransformerMixin",
                  "sklearn.base.ClassNamePrefixFeaturesOutMixin", "sklearn.pipeline.Pipeline",
                  "sklearn.model_selection.GridSearchCV", "sklearn.linear_model.LogisticRegression",
                  "sklearn.preprocessing.StandardScaler", "sklearn.svm.SVC"],
        "function": ["sklearn.model_selection.train_test_split", "sklearn.pipeline.make_pipeline",
                     "sklearn.base.clone", "sklearn.set_config",
                     "sklearn.utils.estimator_checks.parametrize_with_checks"],
    }),
    "torch": ("PyTorch", "2.14", "generated/{name}.html#$", {
        "class": ["torch.nn.Module", "torch.nn.Linear", "torch.nn.BatchNorm2d", "torch.nn.Conv2d",
                  "torch.utils.data.DataLoader", "torch.utils.data.Dataset", "torch.Generator",
                  "torch.optim.AdamW", "torch.optim.lr_scheduler.LinearLR",
                  "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.lr_scheduler.OneCycleLR",
                  "torch.optim.lr_scheduler.SequentialLR", "torch.autocast"],
        "function": ["torch.compile", "torch.nn.utils.fusion.fuse_conv_bn_weights", "torch.manual_seed"],
    }),
    "torchvision": ("torchvision", "0.29", "generated/{name}.html#$", {
        "class": ["torchvision.transforms.v2.RandomResizedCrop", "torchvision.transforms.v2.RandomHorizontalFlip",
                  "torchvision.transforms.v2.Compose", "torchvision.datasets.ImageFolder"],
        "function": ["torchvision.io.decode_jpeg", "torchvision.transforms.v2.functional.resize"],
    }),
    "numpy": ("NumPy", "2.3", "reference/generated/{name}.html#$", {
        "class": ["numpy.ndarray", "numpy.dtype", "numpy.random.RandomState", "numpy.random.Generator"],
        "function": ["numpy.load", "numpy.save"],
    }),
}

# Python's addresses are per module page, not per name.
PYTHON = {
    "class": {"pathlib.Path": "library/pathlib.html#$", "os.PathLike": "library/os.html#$",
              "typing.Any": "library/typing.html#$", "io.BytesIO": "library/io.html#$",
              "concurrent.futures.ProcessPoolExecutor": "library/concurrent.futures.html#$"},
    "exception": {name: "library/exceptions.html#$" for name in
                  ("ValueError", "TypeError", "OSError", "FileNotFoundError", "RuntimeError", "KeyError",
                   "MemoryError")},
    "data": {"None": "library/constants.html#$"},
    "function": {"hashlib.sha256": "library/hashlib.html#$", "urllib.request.urlopen": "library/urllib.request.html#$"},
}


def write(name: str, project: str, version: str, entries: list[tuple[str, str, str]]) -> Path:
    inventory = soi.Inventory()
    inventory.project, inventory.version = project, version
    for obj, role, uri in entries:
        inventory.objects.append(soi.DataObjStr(name=obj, domain="py", role=role, priority="1", uri=uri, dispname="-"))
    path = HERE / f"{name}.inv"
    soi.writebytes(path, soi.compress(inventory.data_file(contract=True)))
    return path


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name, (project, version, pattern, roles) in SITES.items():
        entries = [(obj, role, pattern.format(name=obj)) for role, objs in roles.items() for obj in objs]
        print(write(name, project, version, entries), len(entries), "names")
    entries = [(obj, role, uri) for role, objs in PYTHON.items() for obj, uri in objs.items()]
    print(write("python", "Python", "3", entries), len(entries), "names")


if __name__ == "__main__":
    main()
