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
NOT_MEASURED: dict[tuple[str, str], str] = {
    ("docs/cache.md", "20 s"): "the shared store's default timeout per call (FeatureCache(timeout=20))",
    ("docs/cache.md", "15 minutes"): "the longest a failed store is left alone (the back-off's cap)",
    ("docs/datasets.md", "47 MB"): "the size of the hymenoptera archive that fetch_hymenoptera downloads",
    ("docs/pretrained-features.md", "256 MB"): "glibc's trim threshold the allocator tuning sets",
    ("docs/security.md", "12 GB"): "arithmetic: the size of a 256 x 16.7 million RGB image",
    ("docs/security.md", "10 s"): "the fuzz test's limit per case",
    ("docs/cache.md", "5 KB"): "arithmetic: 1280 float32 features are 5,120 bytes",
    ("docs/pretrained-features.md", "32 MB"): "glibc's mmap threshold the allocator tuning sets",
    ("docs/security.md", "3 GB"): "the fuzz test's limit on peak memory",
    ("docs/feature-options.md", "87.5 %"): "timm's crop_pct 0.875: what the centre crop keeps of each side",
}

# Pages whose figures predate the results files: their benchmarks (benchmarks/finetune.py,
# benchmarks/transfer_options.py: hours on 2 cores) write results files now and have not been
# rerun since; until they are, these pages are not checked. Every other page is.
NOT_YET_SOURCED = {
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


def holds(held: str, value: str) -> bool:
    """Whether ``value`` appears in ``held`` as a whole number (12.5 is not found in 112.5 or 12.55)."""
    pattern = r"(?<![\d.])" + re.escape(value.replace(",", "")) + r"(?!\d|\.\d)"
    return re.search(pattern, held.replace(",", "")) is not None


def test_every_figure_in_the_docs_is_one_a_results_file_holds():
    held = results_text()
    unsourced = []
    for page, number, text, value in quoted_figures():
        if (page, text) in NOT_MEASURED or page in NOT_YET_SOURCED:
            continue
        if not holds(held, value):
            unsourced.append(f"{page}:{number}: {text}")
    assert not unsourced, "figures no results file holds:\n" + "\n".join(unsourced)


def test_a_figure_is_matched_whole():
    assert holds("| 112.5 images/s | 7,976 |", "7976") and holds("112.5 and 12.5", "12.5")
    assert not holds("| 112.5 images/s |", "12.5") and not holds("12.55", "12.5") and not holds("125", "12")


def test_the_check_finds_a_retyped_figure(tmp_path):
    """A figure in prose is found; one in code is not (so the test above can fail)."""
    page = tmp_path / "page.md"
    page.write_text("It runs at 123.4 images/s, 2.5x the loop.\n```\n99 % in code\n```\n`7 ms` inline\n")
    found = [FIGURE.findall(line) for _, line in prose_lines(page)]
    assert [f for f in found if f] == [[("123.4", " images/s"), ("2.5", "x")]]


def console_block(text: str, command: str) -> list[str]:
    """The lines of the first ``console`` block that starts with ``$ command``."""
    match = re.search(r"```console\n\$ " + re.escape(command) + r"\n(.*?)\n```", text, re.S)
    assert match, f"no console block for {command!r}"
    return match.group(1).splitlines()


def test_the_readme_shows_the_demo_as_benchmarks_demo_py_ran_it():
    """The README's transcript is a code block (not checked above): it must be the recorded one."""
    recorded = (ROOT / "benchmarks" / "results" / "demo.md").read_text(encoding="utf-8")
    shown = (ROOT / "README.md").read_text(encoding="utf-8")
    assert console_block(shown, "skltransfer demo") == console_block(recorded, "skltransfer demo")
