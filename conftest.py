"""Doctest collection over the package: skip modules whose optional extra is missing."""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("distributed") is None or importlib.util.find_spec("dask") is None:
    collect_ignore.append("skltransfer/dask.py")
