"""fedloom's documentation, shipped with the package.

The pages of the repository's ``docs/`` folder travel in the package as
``fedloom/docs`` (package data), so that a message naming a page helps after a
``pip install`` too, where there is no docs folder: ``fedloom docs PAGE [SECTION]``
prints the page, or one section of it, as its Markdown text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

DOCS = "docs"
"""The folder of the pages inside the package (the repository's ``docs/``)."""

_FENCE = re.compile(r"(`{3,}|~{3,})")
_HEADING = re.compile(r"(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_ref(page: str, section: str | None = None) -> str:
    """How a message names the documentation page ``page`` (``"tasks"``,
    ``"cli/policy"``), or one ``section`` of it (its anchor): its path in fedloom's
    source, and the command that prints the same text wherever fedloom is installed."""
    anchor = f"#{section}" if section else ""
    command = f"fedloom docs {page}" + (f" {section}" if section else "")
    return f"docs/{page}.md{anchor} (`{command}` prints it)"


def page_names() -> list[str]:
    """Every page, by the name ``fedloom docs`` takes (``tasks``, ``cli/policy``)."""
    root = resources.files("fedloom").joinpath(DOCS)
    names = [entry.name[:-3] for entry in root.iterdir() if entry.name.endswith(".md")]
    cli = root.joinpath("cli")
    if cli.is_dir():
        names += [f"cli/{e.name[:-3]}" for e in cli.iterdir() if e.name.endswith(".md")]
    return sorted(names)


def read_page(page: str) -> str:
    """The Markdown text of ``page``, one of :func:`page_names`."""
    return resources.files("fedloom").joinpath(DOCS, f"{page}.md").read_text(encoding="utf-8")


def title(text: str) -> str:
    """A page's title: its first heading."""
    return next((h.title for h in headings(text)), "")


@dataclass(frozen=True)
class Heading:
    """One heading of a page: its level (1 for ``#``), its title and its line."""

    level: int
    title: str
    line: int

    @property
    def anchor(self) -> str:
        """Its anchor, as the links between pages write it."""
        return anchor_of(self.title)


def headings(text: str) -> list[Heading]:
    """The headings of a Markdown ``text``, in order; lines in code blocks are not."""
    found: list[Heading] = []
    fence = ""
    for number, line in enumerate(text.splitlines()):
        opens = _FENCE.match(line.lstrip())
        if opens and (not fence or opens.group(1).startswith(fence)):
            fence = "" if fence else opens.group(1)[:3]
            continue
        heading = None if fence else _HEADING.fullmatch(line)
        if heading:
            found.append(Heading(len(heading.group(1)), heading.group(2), number))
    return found


def anchor_of(title: str) -> str:
    """A heading's anchor, as GitHub makes it: lower case, punctuation dropped, spaces
    as hyphens (``Migrating from the older interface`` -> ``migrating-from-the-older-
    interface``)."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def section_of(text: str, anchor: str) -> str | None:
    """The section of ``text`` under the heading whose anchor is ``anchor``, down to the
    next heading of its level or above; None if no heading has that anchor."""
    found = headings(text)
    for i, heading in enumerate(found):
        if heading.anchor == anchor:
            end = next((h.line for h in found[i + 1 :] if h.level <= heading.level), None)
            lines = text.splitlines()[heading.line : end]
            return "\n".join(lines).rstrip() + "\n"
    return None
