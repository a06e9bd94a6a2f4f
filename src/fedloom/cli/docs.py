"""``fedloom docs``: fedloom's documentation pages, as shipped with the package, so
that every ``docs/...`` a message names can be read where fedloom is installed."""

from __future__ import annotations

import difflib
from typing import Annotated

import typer

from fedloom.cli.common import console, friendly
from fedloom.docpages import page_names, read_page, section_of, title


@friendly
def docs(
    page: Annotated[
        str | None,
        typer.Argument(
            help="The page: tasks, plan, deploy, cli/policy ... (docs/PAGE.md, and "
            "docs/PAGE.md#SECTION, work too). Without it, the list of pages.",
            show_default=False,
        ),
    ] = None,
    section: Annotated[
        str | None,
        typer.Argument(
            help="One section of the page, by its anchor (migrating-from-the-older-interface).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print a page of fedloom's documentation, or one section of it.

    The docs/ folder of fedloom's source ships with it, as Markdown text."""
    names = page_names()
    if page is None:
        width = max(len(name) for name in names)
        for name in names:
            console.print(f"{name:<{width}}  {title(read_page(name))}", markup=False)
        console.print("`fedloom docs PAGE [SECTION]` prints one.", markup=False)
        return
    page, section = _parse(page, section)
    if page not in names:
        near = difflib.get_close_matches(page, names, n=1)
        guess = f"; did you mean {near[0]}?" if near else ""
        raise typer.BadParameter(
            f"no page {page!r}{guess} The pages: {', '.join(names)}", param_hint="'PAGE'"
        )
    text = read_page(page)
    if section is not None:
        found = section_of(text, section)
        if found is None:
            raise typer.BadParameter(
                f"docs/{page}.md has no section {section!r}; `fedloom docs {page}` prints "
                "the whole page",
                param_hint="'SECTION'",
            )
        text = found
    typer.echo(text, nl=not text.endswith("\n"))


def _parse(page: str, section: str | None) -> tuple[str, str | None]:
    """``page`` as ``fedloom docs`` names it, whether written ``tasks``, ``tasks.md`` or
    ``docs/tasks.md#SECTION`` (as messages name pages), and the section."""
    page, _, anchor = page.partition("#")
    page = page.removeprefix("docs/").removesuffix(".md")
    return page, section or anchor or None
