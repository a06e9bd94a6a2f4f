"""Load the task module of a workspace."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from pathlib import Path

from fedloom.errors import WorkspaceError
from fedloom.tasks.base import Task


def load_task(workspace: str | Path, module: str = "task.py") -> Task:
    """Import ``workspace/module`` and return its ``task`` object."""
    root = Path(workspace).resolve()
    path = root / module
    if not path.is_file():
        raise WorkspaceError(
            f"task module {path} not found",
            hint="the plan's `task:` names a .py file in the workspace",
        )
    name = "fedloom_workspace_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        mod = sys.modules[name]
    else:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise WorkspaceError(f"cannot import {path}")
        mod = importlib.util.module_from_spec(spec)
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        try:
            spec.loader.exec_module(mod)
        except ImportError as err:
            hint = (
                "install the torch extra: pip install 'fedloom[torch]'"
                if err.name == "torch"
                else "check the imports of the task module"
            )
            raise WorkspaceError(f"{path}: cannot import {err.name or err}", hint=hint) from err
        except SyntaxError as err:
            raise WorkspaceError(
                f"{err.filename or path}, line {err.lineno}: syntax error: {err.msg}"
            ) from err
        except Exception as err:
            frames = traceback.extract_tb(err.__traceback__)
            where = next(
                (
                    f"{f.filename}, line {f.lineno}"
                    for f in reversed(frames)
                    if f.filename == str(path)
                ),
                str(path),
            )
            last = traceback.format_exception_only(err)[-1].strip()
            raise WorkspaceError(f"{where}: failed while loading: {last}") from err
        sys.modules[name] = mod
    task = getattr(mod, "task", None)
    if task is None:
        raise WorkspaceError(
            f"{path} defines no `task`",
            hint="end the module with e.g. `task = TorchTask(build_model)`",
        )
    missing = [
        m for m in ("init_weights", "train", "evaluate") if not callable(getattr(task, m, None))
    ]
    if missing:
        raise WorkspaceError(f"{path}: `task` lacks {missing}", hint="see docs/tasks.md")
    return task  # type: ignore[no-any-return]
