"""Workspace templates for ``fedloom init``: each folder is a complete workspace.

A template whose data must be written to disk (files where no dataset ships as files)
has a data hook: a module of this package named after it (``images-folder`` →
``fedloom.templates.images_folder_data``) with ``prepare(workspace) -> str``, which writes
the data into the new workspace and says what it wrote. ``fedloom init`` runs it.
"""

from __future__ import annotations

import importlib
from pathlib import Path


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
