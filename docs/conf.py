"""Sphinx configuration: the user guide (docs/*.md), the API reference (docstrings), the gallery (examples/).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (docs/README.md).
Offline by design: cross-links into scikit-learn, PyTorch, torchvision, NumPy and Python
come from the small inventories in ``docs/_inventories`` (made by ``docs/make_inventories.py``;
the real ones cannot be downloaded here), timm's by URL pattern (timm publishes no inventory).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import skltransfer  # noqa: E402

project = "skltransfer"
author = "the skltransfer developers"
copyright = f"{time.gmtime().tm_year}, {author}"
release = version = skltransfer.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.extlinks",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

root_doc = "index"
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "README.md", "auto_examples/*.ipynb", "auto_examples/*.py", "auto_examples/*.zip",
                    "auto_examples/*.json", "auto_examples/*.md5", "auto_examples/*.codeobj.json"]
templates_path = ["_templates"]

# -- API reference ------------------------------------------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False  # a module's public names are its __all__
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": True}
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks: set[str] = set()

# A dead cross-reference is an error (-W): every :class:, :func: and :mod: must resolve,
# into this package or into an inventory below.
nitpicky = True
nitpick_ignore_regex = [
    # numpydoc renders the free-text types of Parameters sections ("int or None", "path",
    # "array-like of shape (n,)") as plain text, not references; these are the few
    # words autodoc still turns into references from signatures and bases.
    ("py:class", r"(optional|default.*|callable|path|PathLike|array-like.*|file-like.*)"),
    ("py:class", r"sklearn\.(base|utils)\._.*"),  # scikit-learn's private bases and mixins
    ("py:class", r"torch\.utils\.data\.dataset\.Dataset"),
    ("py:class", r"(np|numpy)\.(ndarray|float32|uint8)"),
]



def _skip_metadata_request_setters(app, what, name, obj, skip, options):
    """scikit-learn generates ``set_*_request`` on every estimator; its docs are scikit-learn's."""
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return skip


def setup(app):
    app.connect("autodoc-skip-member", _skip_metadata_request_setters)


# -- cross-links without the network --------------------------------------------------------
intersphinx_mapping = {
    name: (url, str(HERE / "_inventories" / f"{name}.inv"))
    for name, url in {
        "python": "https://docs.python.org/3/",
        "numpy": "https://numpy.org/doc/stable/",
        "sklearn": "https://scikit-learn.org/stable/",
        "torch": "https://docs.pytorch.org/docs/stable/",
        "torchvision": "https://docs.pytorch.org/vision/stable/",
    }.items()
}
intersphinx_timeout = 1
extlinks = {"timm": ("https://huggingface.co/docs/timm/%s", "%s")}

# -- the gallery ----------------------------------------------------------------------------
# Executed at build time: every examples/plot_*.py. Each must run offline, on data that
# installs with the package or lies here, in well under a minute on 2 CPU cores; the
# arguments below keep the slow ones to a subset (the full runs are the examples' own defaults).
GALLERY_ARGS = {
    "plot_finetune_learning_curve.py": ["--max-images", "140", "--epochs", "4"],
    "plot_transfer_options.py": ["--per-class", "10", "--backbones", "tf_efficientnet_lite0"],
    "plot_backbone_search.py": ["--n", "200"],
}


GALLERY_OUT = Path(tempfile.mkdtemp(prefix="skltransfer-gallery-"))  # the examples' own PNGs: not in examples/


def gallery_argv(gallery_conf, script_vars):
    name = Path(script_vars["src_file"]).name
    return GALLERY_ARGS.get(name, []) + ["--out", str(GALLERY_OUT / name.replace(".py", ".png"))]




def _build_machine() -> str:
    """The CPU and core count the gallery ran on, for its index page."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {time.strftime('%Y-%m-%d', time.gmtime())}"


rst_prolog = f".. |build_machine| replace:: {_build_machine()}\n"

os.environ.setdefault("SKLTRANSFER_CACHE_DIR", str(HERE / "_build" / "feature-cache"))  # warm on rebuilds
# The project's shared photos, where this checkout has them beside it (never downloaded by a build).
if (ROOT.parent / "shared" / "data" / "hymenoptera").is_dir():
    os.environ.setdefault("SKLTRANSFER_DATA", str(ROOT.parent / "shared" / "data"))
warnings.filterwarnings("ignore", category=UserWarning, message="Matplotlib is currently using agg")

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"(__init__|_data)\.py",
    "reset_argv": gallery_argv,
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "abort_on_example_error": False,  # every failing example is listed; -W then fails the build
    "only_warn_on_example_error": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "show_memory": False,
    "image_scrapers": ("matplotlib",),
}

# -- HTML -----------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"skltransfer {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
# The guide's pages are top level, so their left sidebar would say "Section Navigation" over
# nothing: without it the text column takes the room. The API and gallery pages keep theirs.
html_sidebars = {page.stem: [] for page in HERE.glob("*.md") if page.stem != "README"}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
myst_heading_anchors = 3
smartquotes = False  # "--max-images" stays two hyphens in the examples' usage lines
suppress_warnings = ["config.cache"]  # the gallery's callable in the config: rebuilds re-read it
