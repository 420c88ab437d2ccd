"""mkdocs hooks (``mkdocs.yml``: ``hooks:``): the pages that are generated from the code, so that
they cannot drift from it.

A page asks for a generated part with a marker line of its own:

* ``<!-- fnbp:cli -->``: every subcommand and option of ``fnbp``, read from the argument parser
  itself (``fnbp.cli._parser()``): its usage, description, and one table row per option with
  its choices, default and help.
* ``<!-- fnbp:api-index -->``: every public name of ``fnbp`` (its ``__all__``), each linked to
  where the API reference renders it, with the first line of its docstring.

An unknown ``<!-- fnbp:... -->`` marker is an error, so a typo cannot leave a page half empty.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from griffe_fnbp import markdown as docstring_markdown  # noqa: E402

MARKER = re.compile(r"^<!-- fnbp:([\w-]+) -->$", re.M)


def on_page_markdown(markdown: str, page, config, files) -> str:
    def generate(match):
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_path}: unknown marker <!-- fnbp:{name} -->; "
                             f"expected one of {sorted(GENERATORS)}")  # fmt: skip
        return GENERATORS[name]()

    return MARKER.sub(generate, markdown)


# ----------------------------------------------------------------------------------------------
# the command line


def cli_reference() -> str:
    """Markdown for every subcommand of the ``fnbp`` parser: usage, description, options."""
    from fnbp.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = []
    for name, p in sub.choices.items():
        usage = p.format_usage().removeprefix("usage: ").strip()
        parts += [f"### `fnbp {name}`", "", "```text", usage, "```", "", _escape(p.description), ""]
        for group in p._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            title = {"positional arguments": "arguments", "options": "options"}.get(
                group.title, group.title
            )
            parts += [f"**{_escape(title)}**", "", "| option | value | default | what it does |",
                      "|---|---|---|---|"]  # fmt: skip
            parts += [_row(a) for a in actions] + [""]
    return "\n".join(parts)


def _row(action: argparse.Action) -> str:
    flags = (
        ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
    )
    if action.choices is not None:
        value = " \\| ".join(f"`{c}`" for c in action.choices)
    elif action.nargs == 0:
        value = "(a switch)"
    else:
        value = f"`{action.metavar or action.dest.upper()}`"
    default = action.default
    hidden = default is None or default is False or default == argparse.SUPPRESS
    shown = "" if hidden or not action.option_strings else f"`{default}`"
    return f"| {flags} | {value} | {shown} | {_escape(action.help or '')} |"


def _escape(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------------------------
# the API index


def api_index() -> str:
    """A table of ``fnbp.__all__``: each name linked (by autorefs) to the object it names where
    the reference renders it, with its docstring's first line."""
    import griffe

    fnbp = griffe.load("fnbp", search_paths=["."], resolve_aliases=True)
    rows = ["| name | what it is |", "|---|---|"]
    for name in fnbp.exports:
        obj = fnbp[name]
        target = obj.final_target if obj.is_alias else obj
        text = docstring_markdown(target.docstring.value) if target.docstring else ""
        summary = text.split("\n\n")[0].replace("\n", " ")
        rows.append(f"| [`fnbp.{name}`][{target.path}] | {_escape(summary)} |")
    return "\n".join(rows)


GENERATORS = {"cli": cli_reference, "api-index": api_index}
