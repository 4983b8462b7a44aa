"""Every measured figure the docs show comes from a file a benchmark wrote (benchmarks/results/).

Tables come in whole through ``{include} ../benchmarks/results/<name>.md``; a figure quoted in
the prose must be one those files hold, so that two pages cannot disagree and a rerun that moves
a figure fails here until the page says what the new results say.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
PAGES = [p for p in PAGES if p.name != "README.md" or p.parent == ROOT]  # docs/README.md: how to build

# What reads as a measurement: a number with a unit of speed, time, size, accuracy or ratio.
FIGURE = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(x\b|\s?(?:%|images/s|img/s|ms\b|us\b|µs\b|s\b|seconds\b|"
                    r"minutes\b|MiB\b|KiB\b|GiB\b|MB\b|GB\b|KB\b|points?\b))")

# Numbers with those units that are settings or facts, not measurements: (page, text) -> why.
NOT_MEASURED: dict[tuple[str, str], str] = {}

# Pages whose figures predate the results files: their benchmarks (benchmarks/finetune.py,
# benchmarks/transfer_options.py: hours on 2 cores) write results files now and have not been
# rerun since; until they are, these pages are not checked. Every other page is.
NOT_YET_SOURCED = {
    "docs/finetune.md": "benchmarks/finetune.py writes results/finetune.{json,md}; not rerun yet",
    "docs/feature-options.md": "benchmarks/transfer_options.py has no results file yet",
}


def prose_lines(page: Path):
    """(line number, text) outside code blocks, with inline code removed."""
    fence = None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            marker = stripped[:3]
            fence = None if fence == marker else (fence or marker)
            continue
        if fence is None:
            yield number, re.sub(r"`[^`]*`", "", line)


def results_text() -> str:
    files = sorted((ROOT / "benchmarks" / "results").glob("*"))
    return "\n".join(f.read_text(encoding="utf-8") for f in files if f.suffix in (".md", ".json", ".txt"))


def quoted_figures():
    for page in PAGES:
        for number, line in prose_lines(page):
            for match in FIGURE.finditer(line):
                yield page.relative_to(ROOT).as_posix(), number, match.group(0), match.group(1)


def test_every_figure_in_the_docs_is_one_a_results_file_holds():
    held = results_text()
    plain = held.replace(",", "")
    unsourced = []
    for page, number, text, value in quoted_figures():
        if (page, text) in NOT_MEASURED or page in NOT_YET_SOURCED:
            continue
        if value not in held and value.replace(",", "") not in plain:
            unsourced.append(f"{page}:{number}: {text}")
    assert not unsourced, "figures no results file holds:\n" + "\n".join(unsourced)


def test_the_check_finds_a_retyped_figure(tmp_path):
    """A figure in prose is found; one in code is not (so the test above can fail)."""
    page = tmp_path / "page.md"
    page.write_text("It runs at 123.4 images/s, 2.5x the loop.\n```\n99 % in code\n```\n`7 ms` inline\n")
    found = [FIGURE.findall(line) for _, line in prose_lines(page)]
    assert [f for f in found if f] == [[("123.4", " images/s"), ("2.5", "x")]]
