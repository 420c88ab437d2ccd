"""Tests of README.md against the source: the backward-pass listing is the code as it is."""

import importlib
import inspect
import re
from pathlib import Path

import test_bad_inputs

from fnbp import engine

README = Path(__file__).resolve().parent.parent / "README.md"
backprop = importlib.import_module("fnbp.backprop")


def _block_after(text: str, marker: str) -> str:
    start = text.index("```python", text.index(marker)) + len("```python\n")
    return text[start : text.index("```", start)]


def test_readme_backward_pass_listing_is_the_source():
    listing = _block_after(README.read_text(), "The whole backward pass")
    for fn in (engine.backward_seq, engine.act_backward, backprop._backward):
        assert inspect.getsource(fn).rstrip() in listing, f"README listing of {fn.__name__} drifted"


def test_readme_counts_the_bad_input_catalogue_as_it_is():
    found = re.search(
        r"catalogue of (\d+) such command lines and (\d+) bad API", README.read_text()
    )
    assert found, "README no longer counts the bad-input catalogue"
    assert (int(found[1]), int(found[2])) == (len(test_bad_inputs.CLI), len(test_bad_inputs.API))


def test_readme_layout_names_every_module_and_experiment():
    text = README.read_text()
    layout = text[text.index("## Layout") :]
    root = README.parent
    names = [p.relative_to(root).as_posix() for p in (root / "fnbp").glob("*.py")]
    names = [n for n in names if not n.endswith("__init__.py")]
    names += [p.name for d in ("layers", "theory", "instruments") for p in (root / "fnbp" / d).glob("*.py")
              if p.name != "__init__.py"]  # fmt: skip
    names += [p.name for p in (root / "experiments").glob("*.py")]
    missing = [n for n in names if n not in layout and n.replace("fnbp/", "") not in layout]
    assert not missing, f"README's Layout does not name {missing}"
