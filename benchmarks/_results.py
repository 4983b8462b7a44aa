"""Where a benchmark's figures go: ``benchmarks/results/<name>.json`` and ``<name>.md``.

The JSON holds every figure with the machine and the command; the Markdown is the table
the docs include (``{include} ../benchmarks/results/<name>.md``). Docs never retype a
figure: ``tests/test_docs.py`` fails on a measured figure that no results file holds.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from _machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"


def command() -> str:
    script = Path(sys.argv[0]).name
    return shlex.join(["python", f"benchmarks/{script}", *sys.argv[1:]])


def write_results(name: str, figures: dict, table: str, *, directory: Path = RESULTS, gpu: str | None = None,
                  measured_on: str | None = None) -> Path:
    """Write ``figures`` (with the machine and the command) and ``table`` (Markdown, with a footer).

    ``gpu``: the GPU the figures were computed on (None: no GPU). ``measured_on``: the machine,
    where the figures were measured elsewhere (rows of another machine's log, tabled here).
    """
    directory.mkdir(parents=True, exist_ok=True)
    where = measured_on or machine() + (f", {gpu}" if gpu else "")
    record = {"machine": where, "command": command(), **figures}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    footer = f"Machine: {record['machine']}{'' if gpu else ', no GPU'}. Command: `{record['command']}`."
    (directory / f"{name}.md").write_text(table.rstrip("\n") + "\n\n" + footer + "\n")
    print(f"results: {path} (and {name}.md)", flush=True)
    return path
