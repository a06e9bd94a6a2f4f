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


# ------------------------------------------------------------ a pretrained base model

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files that unpickle when loaded: a base model must be saved as safetensors."""


def base_model_folder(root: Path, base: str) -> Path:
    """The plan's ``model.base`` as a folder: relative to the workspace, or absolute."""
    path = Path(base).expanduser()
    return path if path.is_absolute() else root / path


def base_model_files(folder: Path) -> list[tuple[str, Path]]:
    """The files of a base model folder (``save_pretrained``'s: ``config.json`` and
    safetensors weights, a tokenizer's files), by relative POSIX path, sorted. Refuses
    a folder that is missing, has no config or weights, or holds pickled weights."""
    from fedloom.core.errors import WorkspaceError

    if not folder.is_dir():
        raise WorkspaceError(
            f"model.base: the base model folder {folder} does not exist",
            hint="name the folder save_pretrained() wrote, relative to the workspace or "
            "absolute; every site needs the same copy",
        )
    files = sorted(
        (p.relative_to(folder).as_posix(), p)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    names = [rel for rel, _ in files]
    pickled = [rel for rel in names if rel.endswith(PICKLED_SUFFIXES)]
    if pickled:
        raise WorkspaceError(
            f"model.base: {folder} holds pickled weights ({', '.join(pickled[:3])}); fedloom "
            "loads no pickle",
            hint="save the model with save_pretrained(folder) (safetensors, the default) "
            "and remove the pickled files",
        )
    if "config.json" not in names or not any(rel.endswith(".safetensors") for rel in names):
        raise WorkspaceError(
            f"model.base: {folder} is not a saved model (it needs config.json and "
            ".safetensors weights)",
            hint="write it with model.save_pretrained(folder)",
        )
    return files


_digests: dict[tuple[object, ...], str] = {}


def base_model_digest(folder: Path) -> str:
    """sha256 over every file of the base model folder (its path and the sha256 of its
    bytes): what the plan hash covers of ``model.base``. Cached per process while no
    file's size or modification time changes."""
    files = base_model_files(folder)
    key = (
        str(folder.resolve()),
        *((rel, st.st_size, st.st_mtime_ns) for rel, st in ((r, p.stat()) for r, p in files)),
    )
    if key not in _digests:
        h = hashlib.sha256(b"fedloom-base-model-v1\0")
        for rel, path in files:
            h.update(b"\0file\0" + rel.encode() + b"\0")
            h.update(_file_sha256(path))
        _digests[key] = h.hexdigest()
    return _digests[key]


def file_digest(path: Path) -> str:
    """sha256 hex of a file's bytes (what the plan hash covers of ``model.initial``).
    Cached per process while its size and modification time stay."""
    st = path.stat()
    key = ("file", str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = _file_sha256(path).hex()
    return _digests[key]


def _file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.digest()
