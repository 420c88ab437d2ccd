"""The documentation site (mkdocs.yml, docs/) and README.md against the code.

* The site builds with ``mkdocs build --strict`` (what ``bash scripts/docs.sh`` runs): a broken
  link or anchor, a page left out of the nav, a missing snippet or figure, or a docstring naming
  a parameter its signature lacks (scripts/docs/griffe_fnbp.py) fails it.
* The API reference renders every public name: every module of fnbp, every public function and
  class, and every name of every ``__all__`` (checked in the site's objects.inv).
* A listing marked ``<!-- source: module.function ... -->`` holds each function's source as it is.
* The formula tables of docs/math.md name files and functions that exist.
* The numbers and names the pages quote from the tests and the tree are as they are: the
  bad-input catalogue's size (docs/cli.md) and every module and experiment (docs/layout.md).
* Every example runs: tests/test_docs_examples.py.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import test_bad_inputs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))
LISTING = re.compile(r"<!-- source: ([\w. ]+) -->\n```python\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built once for the module: ``(folder, completed process)``."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    return out, done


def test_the_site_builds_in_strict_mode(site):
    out, done = site
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out / "index.html").is_file() and (out / "api" / "train" / "index.html").is_file()
    cli = (out / "cli" / "index.html").read_text()
    assert "<!-- fnbp:cli -->" not in cli and "--early-stopping" in cli  # generated from the parser


def _inventory(out: Path) -> set[str]:
    """The object names of the site's objects.inv (Sphinx inventory version 2)."""
    header, body = (out / "objects.inv").read_bytes().split(b"compressed using zlib.\n", 1)
    assert header.startswith(b"# Sphinx inventory version 2")
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}


def _public_names() -> set[str]:
    """Every module of fnbp, its public functions and classes (not imported ones), and the
    targets of every ``__all__`` entry, by their full paths (griffe reads the source)."""
    import griffe

    fnbp = griffe.load("fnbp", search_paths=[str(ROOT)], resolve_aliases=True)
    names, modules = set(), [fnbp]
    while modules:
        module = modules.pop()
        names.add(module.path)
        modules += [m for m in module.modules.values() if not m.is_alias]  # not `import … as fx`
        for name, obj in module.members.items():
            if obj.is_alias:
                if module.exports and name in module.exports:
                    names.add(obj.final_target.path)
            elif not name.startswith("_") and obj.is_function | obj.is_class:
                names.add(obj.path)
            elif module.exports and name in module.exports:
                names.add(obj.path)
    return names


def test_the_api_reference_renders_every_public_name(site):
    out, done = site
    assert done.returncode == 0, done.stderr[-4000:]
    missing = sorted(_public_names() - _inventory(out))
    assert not missing, f"the API reference does not render {missing}"


def _source_listings():
    for path in [README, *PAGES]:
        for names, code in LISTING.findall(path.read_text()):
            yield path, names.split(), code


def test_marked_listings_are_the_source_as_it_is():
    listings = list(_source_listings())
    assert any("fnbp.engine.backward_seq" in names for _, names, _ in listings)  # the math page's
    for path, names, code in listings:
        for name in names:
            module, attr = name.rsplit(".", 1)
            source = inspect.getsource(getattr(importlib.import_module(module), attr)).rstrip()
            assert source in code, f"{path.relative_to(ROOT)}: the listing of {name} drifted"


def _table_references(text: str):
    """``(file, [names])`` for every `` `fnbp/….py`: `name`, … `` in the tables of ``text``."""
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        for cell in line.split(" | "):
            for part in cell.split(";"):
                found = re.search(r"`(fnbp/[\w/]+\.py)`(.*)", part)
                if not found:
                    continue
                path, rest = found.groups()
                for sibling in re.findall(r"`(\w+\.py)`", rest):  # `dense.py`, `reshape.py`
                    yield str(Path(path).parent / sibling), []
                names = re.findall(r"`([\w.]+)`", rest.split(":", 1)[1]) if ":" in rest else []
                yield path, [n for n in names if not n.endswith(".py")]


def test_the_formula_tables_name_files_and_functions_that_exist():
    refs = list(_table_references((DOCS / "math.md").read_text()))
    assert len(refs) >= 15, refs  # both tables: the MLP's formulas and each kind's rule
    for path, names in refs:
        source = (ROOT / path).read_text() if (ROOT / path).is_file() else None
        assert source is not None, f"docs/math.md names {path}, which does not exist"
        for name in names:
            first, *rest = name.split(".")
            defined = rf"^\s*(def|class) {first}\b|^{first}\b\s*[:=]"
            assert re.search(defined, source, re.M), f"docs/math.md: {path} defines no {first}"
            assert all(re.search(rf"\b{r}\b", source) for r in rest), f"{path}: no {name}"


def test_the_command_line_page_counts_the_bad_input_catalogue_as_it_is():
    found = re.search(
        r"catalogue of (\d+) such command lines and (\d+) bad API", (DOCS / "cli.md").read_text()
    )
    assert found, "docs/cli.md no longer counts the bad-input catalogue"
    assert (int(found[1]), int(found[2])) == (len(test_bad_inputs.CLI), len(test_bad_inputs.API))


def test_the_layout_page_names_every_module_and_experiment():
    layout = (DOCS / "layout.md").read_text()
    names = [p.relative_to(ROOT).as_posix() for p in (ROOT / "fnbp").glob("*.py")]
    names = [n for n in names if not n.endswith("__init__.py")]
    names += [p.name for d in ("layers", "theory", "instruments") for p in (ROOT / "fnbp" / d).glob("*.py")
              if p.name != "__init__.py"]  # fmt: skip
    names += [p.name for p in (ROOT / "experiments").glob("*.py")]
    missing = [n for n in names if n not in layout and n.replace("fnbp/", "") not in layout]
    assert not missing, f"docs/layout.md does not name {missing}"
