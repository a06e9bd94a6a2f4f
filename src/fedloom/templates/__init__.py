"""Workspace templates for ``fedloom init``: each folder is a complete workspace, and
:func:`create_workspace` copies one into a new folder.

A template whose data must be written to disk (files where no dataset ships as files)
has a data hook: a module of this package named after it (``images-folder`` →
``fedloom.templates.images_folder_data``) with ``prepare(workspace) -> str``, which writes
the data into the new workspace and says what it wrote. ``fedloom init`` runs it.
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path

from fedloom.core.errors import WorkspaceError


def prepare(template: str, workspace: Path) -> str | None:
    """Run the template's data hook in ``workspace``: what it wrote, or None when the
    template has no hook."""
    name = f"{__name__}.{template.replace('-', '_')}_data"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            return None
        raise
    hook = getattr(module, "prepare", None)
    return str(hook(Path(workspace))) if callable(hook) else None


TEMPLATES = (
    "digits",
    "breast-cancer",
    "mnist",
    "synthetic",
    "regression",
    "images-folder",
    "segmentation",
    "llm-lora",
    "cohort",
)


def create_workspace(
    directory: str | Path, template: str = "digits", *, force: bool = False, data: bool = True
) -> Path:
    """Copy the template ``template`` into ``directory`` and return its path; with
    ``data``, also write the data files a template reads from disk (its data hook,
    :func:`fedloom.templates.prepare`).

    Refuses a folder that exists and is not empty unless ``force``.
    """
    target = Path(directory)
    template = template.replace("_", "-")  # breast_cancer (the dataset's name) works too
    if template not in TEMPLATES:
        raise WorkspaceError(
            f"unknown template {template!r}", hint=f"choose one of {', '.join(TEMPLATES)}"
        )
    check_target(target, force=force)
    target.mkdir(parents=True, exist_ok=True)
    source = resources.files("fedloom.templates").joinpath(template)
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith("__"):
            (target / item.name).write_bytes(item.read_bytes())
    if data:
        prepare(template, target)
    return target


def check_target(target: Path, *, force: bool, how: str = "force=True") -> None:
    """Refuse ``target`` for a new workspace if it exists and is not empty, unless
    ``force``; the hint says ``how`` the caller forces it (``force=True`` from Python,
    ``--force`` on the command line)."""
    if target.exists() and any(target.iterdir()) and not force:
        raise WorkspaceError(
            f"{target} exists and is not empty",
            hint=f"pick a new folder, or pass {how} to write the workspace into it",
        )
