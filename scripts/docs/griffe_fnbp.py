"""A griffe extension: fnbp's docstrings as mkdocstrings renders them (``mkdocs.yml`` names it).

fnbp's docstrings are Google style with a little reStructuredText that Markdown does not read;
this turns it into Markdown before mkdocstrings renders it:

* roles, ``:func:`fit``` (also ``:class:``, ``:mod:``, ``:meth:``, ``:attr:``, ``:data:``), become
  code spans: `` `fit` ``;
* a paragraph ending in ``::`` and the indented block after it become the paragraph (ending in
  ``:``) and a fenced ``text`` block;
* a simple table (rows framed by ``====  ====`` rules) becomes a Markdown table.

It also checks every ``Arguments:`` entry against the signature. fnbp lists parameters that
share a description together (``x_test, y_test: ...``), which griffe's own check would call
unknown, so that check is off in ``mkdocs.yml`` and this one splits such entries first: a name
that is not a parameter is a warning, which fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc):`~?([^`]+)`")
RULE = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")
PARAMETER_SECTIONS = ("Arguments:", "Args:", "Parameters:", "Keyword Arguments:")


def markdown(text: str) -> str:
    """``text`` (a docstring) with its roles, literal blocks and simple tables in Markdown."""
    text = _tables(_literal_blocks(text.split("\n")))  # before the roles: columns by position
    return ROLE.sub(lambda m: f"``{m.group(1)}``", text)


def _literal_blocks(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        head = line.rstrip()[:-2].rstrip()
        out.append(head + ":" if head.strip() else "")
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block = []
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
        ):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        if not block:  # nothing indented follows: a colon, no block
            i += 1
            continue
        inner = min(len(b) - len(b.lstrip()) for b in block if b.strip())
        pad = " " * indent
        out += ["", f"{pad}```text", *[pad + b[inner:] for b in block], f"{pad}```", ""]
        i = j
    return out


def _tables(lines: list[str]) -> str:
    out, i = [], 0
    while i < len(lines):
        rule = RULE.match(lines[i])
        if not rule:
            out.append(lines[i])
            i += 1
            continue
        pad = rule.group(1)
        spans = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[i])]
        rows, j, rules = [], i + 1, 1
        while j < len(lines) and rules < 3:
            if RULE.match(lines[j]):
                rules += 1
            elif lines[j].strip():
                cells = _cells(lines[j], spans)
                if rows and not cells[0] and rules > 1:  # a continuation line of the row above
                    rows[-1] = [f"{p} {c}".strip() for p, c in zip(rows[-1], cells, strict=True)]
                else:
                    rows.append(cells)
            j += 1
        if rules < 3 or not rows:  # not a simple table after all
            out.append(lines[i])
            i += 1
            continue
        head, *body = rows
        out += ["", pad + "| " + " | ".join(head) + " |", pad + "|" + "---|" * len(head)]
        out += [pad + "| " + " | ".join(r) + " |" for r in body] + [""]
        i = j
    return "\n".join(out)


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    """The cells of a row under the rule's column spans; a cell that runs past its column's
    end (the rule one character short) ends at the next space instead."""
    cells, start = [], spans[0][0]
    for k in range(len(spans)):
        if k == len(spans) - 1:
            end = len(line)
        else:
            end = spans[k][1]
            while end < len(line) and line[end] != " ":
                end += 1
        cells.append(line[start:end].strip().replace("|", "\\|"))
        start = max(end, spans[k + 1][0]) if k + 1 < len(spans) else end
    return cells


class FnbpDocstrings(griffe.Extension):
    """Markdown docstrings (:func:`markdown`) and parameter names checked against signatures."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)

    def on_function_instance(self, *, func: griffe.Function, **kwargs) -> None:
        if func.docstring is None:
            return
        known = {p.name for p in func.parameters}
        section, lines = None, func.docstring.value.split("\n")
        for n, line in enumerate(lines):
            stripped = line.strip()
            if stripped in PARAMETER_SECTIONS:
                section, indent = stripped, None
                continue
            if section is None or not stripped:
                continue
            width = len(line) - len(line.lstrip())
            if indent is None:
                indent = width
            if width < indent:  # the section ended
                section = None
                continue
            entry = re.match(r"([\w*]+(?:\s*,\s*[\w*]+)*)(?:\s*\([^)]*\))?\s*:", stripped)
            if width == indent and entry:
                for name in re.split(r"\s*,\s*", entry.group(1)):
                    if name.lstrip("*") not in known:
                        griffe.logger.warning(
                            f"{func.relative_filepath}:{func.docstring.lineno + n}: {func.path}: "
                            f"the docstring's {section} names {name!r}, which is not a parameter"
                        )
