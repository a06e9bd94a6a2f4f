"""Workspaces: a folder with ``federation.yaml`` and the task module, and the code it
holds (what the plan hash covers and the task loader runs)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

# ------------------------------------------------------------ the workspace's code

SKIPPED_DIRS = frozenset({"runs", ".venv", "venv", "__pycache__", ".git"})
"""Folders, at any depth, whose files are neither hashed nor imported from."""


@dataclass(frozen=True)
class WorkspaceCode:
    """The ``.py`` files of a workspace, read once: the bytes the plan hash covers are
    the bytes the task loader compiles. Keys are paths relative to the workspace, in
    POSIX form, sorted."""

    root: Path
    files: Mapping[str, bytes]

    @classmethod
    def read(cls, workspace: str | Path) -> WorkspaceCode:
        root = Path(workspace).resolve()
        found = {
            path.relative_to(root).as_posix(): path.read_bytes() for path in _python_files(root)
        }
        return cls(root, MappingProxyType(dict(sorted(found.items()))))

    def digest(self) -> str:
        """sha256 over every file's path and the sha256 of its bytes."""
        h = hashlib.sha256()
        self.update(h)
        return h.hexdigest()

    def update(self, h: Any) -> None:
        """Feed every file, in order, to the hash object ``h`` (the plan hash's part)."""
        for rel, data in self.files.items():
            h.update(b"\0file\0" + rel.encode() + b"\0")
            h.update(hashlib.sha256(data).digest())


def _python_files(root: Path) -> Iterable[Path]:
    for path in root.rglob("*.py"):
        if path.is_file() and not any(
            part in SKIPPED_DIRS for part in path.relative_to(root).parts[:-1]
        ):
            yield path
