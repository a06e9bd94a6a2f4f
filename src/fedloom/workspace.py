"""Workspaces: a folder with ``federation.yaml`` and the task module."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fedloom.errors import WorkspaceError

TEMPLATES = ("digits", "breast-cancer", "mnist", "synthetic")


def create_workspace(
    directory: str | Path, template: str = "digits", *, force: bool = False
) -> Path:
    """Copy the template ``template`` into ``directory`` and return its path.

    Refuses a folder that exists and is not empty unless ``force``.
    """
    target = Path(directory)
    template = template.replace("_", "-")  # breast_cancer (the dataset's name) works too
    if template not in TEMPLATES:
        raise WorkspaceError(
            f"unknown template {template!r}", hint=f"choose one of {', '.join(TEMPLATES)}"
        )
    if target.exists() and any(target.iterdir()) and not force:
        raise WorkspaceError(
            f"{target} exists and is not empty", hint="pick a new folder, or pass --force"
        )
    target.mkdir(parents=True, exist_ok=True)
    source = resources.files("fedloom.templates").joinpath(template)
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith("__"):
            (target / item.name).write_bytes(item.read_bytes())
    return target
