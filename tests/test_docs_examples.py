"""Every example in the documentation (docs/*.md) and README.md runs.

Each fenced ``python`` block of a page (and of README.md) carries a marker on the line above it:
``<!-- run -->`` (an example: the page's run blocks are executed in order, as one script, in a
fresh process in an empty folder), ``<!-- source: … -->`` (a listing, checked against the source
by tests/test_docs.py) or ``<!-- not run: why -->``. A block marked ``<!-- output -->`` right
after a run block is what that block prints: its lines must match exactly, where a line ``...``
stands for any lines and ``...`` inside a line for any text.

Each page's examples run in a process of their own, so this file is apart from
tests/test_docs.py: pytest-xdist (``--dist loadfile``) can run the two on different workers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import xla_flags

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))

# A fenced block: the marker line above it (if any), its language, its body.
FENCE = re.compile(r"(?:^<!-- ([^>]*?) -->\n)?^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SEPARATOR = "\x1eblock"  # printed between blocks, so each block's output can be told apart


def _blocks(path: Path) -> list[tuple[str | None, str, str, int]]:
    """``(marker, language, body, line)`` for each fenced block of ``path``, in order."""
    text = path.read_text()
    return [(m[1], m[2], m[3], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def _examples(path: Path) -> list[tuple[str, str | None, int]]:
    """``(code, claimed output or None, line)`` of each run block of ``path``, in order."""
    blocks, out = _blocks(path), []
    for i, (marker, _lang, body, line) in enumerate(blocks):
        if marker == "run":
            following = blocks[i + 1] if i + 1 < len(blocks) else None
            claimed = following[2] if following and following[0] == "output" else None
            out.append((body, claimed, line))
    return out


EXAMPLE_PAGES = [p for p in [README, *PAGES] if _examples(p)]
# pages whose printed output depends on XLA's optimization level (see below)
ROUNDING_PAGES = {"docs/crosscheck.md"}


def test_every_python_block_is_an_example_a_listing_or_says_why_not():
    for path in [README, *PAGES]:
        blocks = _blocks(path)
        for i, (marker, lang, _, line) in enumerate(blocks):
            where = f"{path.relative_to(ROOT)}:{line}"
            if lang == "python":
                assert marker is not None and re.match(r"run$|source: |not run: \S", marker), (
                    f"{where}: a python block needs <!-- run -->, <!-- source: … --> or "
                    "<!-- not run: why --> on the line above it"
                )
            if marker == "output":
                assert i > 0 and blocks[i - 1][0] == "run", (
                    f"{where}: an output block follows no run block"
                )
    assert len(EXAMPLE_PAGES) >= 4, EXAMPLE_PAGES


def _pattern(claimed: str) -> re.Pattern:
    """The regex of a claimed output: lines literal, ``...`` any lines or any text in a line."""
    parts = []
    for line in claimed.rstrip("\n").split("\n"):
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*".join(map(re.escape, line.rstrip().split("..."))) + r"\n")
    return re.compile("".join(parts))


def test_a_claimed_output_matches_literally_with_ellipses_for_what_it_leaves_out():
    pattern = _pattern("head\n...\nx = ... s\nlast\n")
    assert pattern.fullmatch("head\na\nb\nx = 1.5 s\nlast\n")
    assert pattern.fullmatch("head\nx = 2 s\nlast\n")  # "..." may stand for no line
    assert not pattern.fullmatch("head\nx = 2 s\nlast\nmore\n")  # nothing after the last line
    assert not pattern.fullmatch("head\nx = 2 ms\nlast\n")
    assert not _pattern("True\n").fullmatch("False\n")


@pytest.mark.parametrize("path", EXAMPLE_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_examples_of_a_page_run_and_print_what_it_claims(path, tmp_path):
    examples = _examples(path)
    script = "\n".join(
        f"print({SEPARATOR!r}, {i}, flush=True)\n{code}" for i, (code, _, _) in enumerate(examples)
    )
    (tmp_path / "examples.py").write_text(script)
    # A page whose printed rounding noise (finite differences' errors) depends on XLA's
    # optimization level runs at XLA's default, as a reader runs it; the others print nothing
    # the level changes and run at the suite's (scripts/test.sh lowers it), in about half the
    # time (the five pages: 55 s at the default, 32 s at the suite's level)
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    if path.relative_to(ROOT).as_posix() in ROUNDING_PAGES:
        env["XLA_FLAGS"] = xla_flags(drop="--xla_backend_optimization_level")
    done = subprocess.run([sys.executable, "examples.py"], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    printed = done.stdout.split(SEPARATOR + " ")[1:]
    ran = len(printed)
    where = f"{path.relative_to(ROOT)}:{examples[ran - 1][2]}" if ran else str(path)
    assert done.returncode == 0, f"the example at {where} failed:\n{done.stderr[-3000:]}"
    assert ran == len(examples)
    for (_code, claimed, line), out in zip(examples, printed, strict=True):
        out = out.split("\n", 1)[1] if "\n" in out else ""  # drop the block number
        if claimed is not None:
            assert _pattern(claimed).fullmatch(out), (
                f"{path.relative_to(ROOT)}:{line} printed\n{out}\nbut the page claims\n{claimed}"
            )
