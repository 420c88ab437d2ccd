"""Tests of README.md, the front page: what it links to exists. (Its ``fnbp check`` listing is
checked by tests/test_crosscheck.py, its example by tests/test_docs_examples.py; the content that
moved from it into docs/ is checked there by tests/test_docs.py.)"""

import re
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings, as mkdocs (and, for ASCII headings, GitHub)
    make them."""
    headings = re.findall(
        r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M
    )
    return {slugify(h, "-") for h in headings}


def test_readme_links_point_at_files_and_headings_that_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(local) >= 10, local  # the front page links into the site
    for link in local:
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), f"README.md links to {path}, which does not exist"
        if anchor:
            assert anchor in _anchors(ROOT / path), f"README.md links to {link}: no such heading"
