"""Load the task module of a workspace: from its source, and only from its source.

The plan hash covers the workspace's ``.py`` files and nothing else, so that is all
that may run from the workspace. The loader compiles the very bytes it read for the
hash (a :class:`~fedloom.workspace.WorkspaceCode`), never a bytecode cache
(``__pycache__/*.pyc``) and never writes one. The task's own imports of other workspace
modules (``import helpers``, ``from code import model``) go through the same snapshot;
any other file of the workspace that Python could import (a ``.pyc``, a compiled
extension ``.so``/``.pyd``, a ``.py`` under a skipped folder such as ``runs/``) is
refused with an error that names it. Installed libraries, in a virtual environment
inside the workspace or elsewhere, are imported as usual.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import linecache
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from fedloom.core.errors import WorkspaceError
from fedloom.docpages import doc_ref
from fedloom.tasks.base import LoadsModel, ModelSource, Task
from fedloom.workspace import SKIPPED_DIRS, WorkspaceCode

_INSTALLED = {"site-packages", "dist-packages"}  # an environment's libraries


class RefusedImport(ImportError):
    """A module of the workspace that the plan hash does not cover."""


class WorkspaceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds and loads the modules of one workspace from its code snapshot.

    Sits on ``sys.meta_path`` just before the path finder, so workspace modules shadow
    installed ones as they did when the workspace was on ``sys.path`` (never a built-in).
    """

    def __init__(self, code: WorkspaceCode) -> None:
        self.code = code
        self.root = code.root
        self.dirs = {p.as_posix() for rel in code.files for p in Path(rel).parents} - {"."}
        self._rels: dict[str, str | None] = {}

    def module_names(self) -> set[str]:
        """The names of the modules and packages this workspace provides."""
        names = {d.replace("/", ".") for d in self.dirs}
        for rel in self.code.files:
            parts = rel.removesuffix(".py").split("/")
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        return names

    # -- finding

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        tail = fullname.rpartition(".")[2]
        # where Python would look inside the workspace: for a top-level name, the
        # workspace itself (once on sys.path) and any folder of it that is on sys.path
        # (the current directory with `python -m`, a project installed in editable
        # mode); for a submodule, its package's folders
        entries = [str(self.root), *sys.path] if path is None else list(path)
        inside = [e for e in entries if isinstance(e, str) and self._rel(e or ".") is not None]
        rels = [self._rel(e or ".") for e in inside]
        bases = list(dict.fromkeys("" if r == "." else f"{r}/" for r in rels))
        for base in bases:
            if f"{base}{tail}.py" in self.code.files:
                return self._spec(fullname, f"{base}{tail}.py", package=False)
            if f"{base}{tail}/__init__.py" in self.code.files:
                return self._spec(fullname, f"{base}{tail}/__init__.py", package=True)
        found = _path_spec(fullname, inside) if inside else None
        if found is not None and found.loader is not None and self._inside(found):
            raise RefusedImport(
                f"{_where(found)}: not loaded: fedloom imports only the workspace's .py "
                "source files, which the plan hash covers (not a .pyc, a compiled .so/.pyd, "
                f"or a file under {', '.join(sorted(SKIPPED_DIRS))}); remove it, or install "
                "it as a package",
                name=fullname,
            )
        for base in bases:
            rel = f"{base}{tail}"
            if rel in self.dirs and getattr(_path_spec(fullname, path), "loader", None) is None:
                spec = importlib.machinery.ModuleSpec(fullname, self, is_package=True)
                spec.submodule_search_locations = [str(self.root / rel)]
                return spec  # a folder of modules without __init__.py
        return None

    def _spec(self, fullname: str, rel: str, *, package: bool) -> importlib.machinery.ModuleSpec:
        path = self.root / rel
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=str(path), is_package=package)
        spec.has_location = True
        if package:
            spec.submodule_search_locations = [str(path.parent)]
        spec.loader_state = rel
        return spec

    def _inside(self, spec: importlib.machinery.ModuleSpec) -> bool:
        places = [spec.origin] if spec.origin else []
        places += list(spec.submodule_search_locations or [])
        return any(self._rel(place) is not None for place in places)

    def _rel(self, place: str) -> str | None:
        """``place`` relative to the workspace (``.`` for the workspace itself), or
        ``None`` when it lies outside it or in an environment's libraries."""
        if place not in self._rels:
            try:
                rel: str | None = Path(os.path.realpath(place)).relative_to(self.root).as_posix()
            except ValueError:
                rel = None
            if rel is not None and _INSTALLED.intersection(rel.split("/")):
                rel = None
            self._rels[place] = rel
        return self._rels[place]

    # -- loading

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        rel = spec.loader_state if spec is not None else None
        if not isinstance(rel, str):
            return  # a folder without __init__.py: nothing to run
        source = self.code.files[rel]  # the bytes the plan hash covers
        filename = str(self.root / rel)
        # tracebacks and inspect.getsource show these bytes, whatever the disk holds now
        lines = source.decode("utf-8", "replace").splitlines(keepends=True)
        linecache.cache[filename] = (len(source), None, lines, filename)
        code = compile(source, filename, "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 - the approved task code, by design


def _path_spec(fullname: str, path: Sequence[str] | None) -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.machinery.PathFinder.find_spec(fullname, path)
    except (ImportError, ValueError):
        return None


def _where(spec: importlib.machinery.ModuleSpec) -> str:
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        return spec.origin
    return ", ".join(spec.submodule_search_locations or []) or spec.name


def _install(finder: WorkspaceFinder) -> None:
    """Put ``finder`` on ``sys.meta_path`` ahead of the finders of workspaces loaded
    before (an older one of the same workspace is removed), and forget the modules they
    loaded that this workspace's code provides or replaces: a ``helpers`` module cached
    from another workspace, or from older code of this one, must not stand in for the
    code this workspace's plan hash covers."""
    provided = finder.module_names()
    for old in [f for f in sys.meta_path if isinstance(f, WorkspaceFinder)]:
        if old.root == finder.root:
            sys.meta_path.remove(old)
        for name, mod in list(sys.modules.items()):
            if getattr(getattr(mod, "__spec__", None), "loader", None) is old and (
                old.root == finder.root or name in provided
            ):
                del sys.modules[name]
    at = next(
        (
            i
            for i, f in enumerate(sys.meta_path)
            if isinstance(f, WorkspaceFinder) or f is importlib.machinery.PathFinder
        ),
        len(sys.meta_path),
    )
    sys.meta_path.insert(at, finder)


def load_task(
    workspace: str | Path | WorkspaceCode,
    module: str = "task.py",
    model: ModelSource | None = None,
) -> Task:
    """Import ``workspace/module`` from its source and return its ``task`` object.

    Pass the :class:`WorkspaceCode` that the plan hash was computed from, so the code
    that runs is exactly the code that was hashed; a folder is read afresh. ``model``
    is the plan's model section (:meth:`fedloom.plan.Plan.model_source`), handed to a
    task that loads its model from disk (:class:`LoadsModel`).
    """
    code = workspace if isinstance(workspace, WorkspaceCode) else WorkspaceCode.read(workspace)
    root = code.root
    path = root / module
    if module not in code.files:
        raise WorkspaceError(
            f"task module {path} not found",
            hint="the plan's `task:` names a .py file in the workspace",
        )
    key = hashlib.sha256(f"{root}\0{module}\0{code.digest()}".encode()).hexdigest()[:16]
    name = "fedloom_workspace_" + key
    mod = sys.modules.get(name)
    if mod is None:
        finder = next(
            (f for f in sys.meta_path if isinstance(f, WorkspaceFinder) and f.code == code),
            None,
        ) or WorkspaceFinder(code)
        if finder not in sys.meta_path:
            _install(finder)
        spec = finder._spec(name, module, package=False)
        mod = importlib.util.module_from_spec(spec)
        try:
            finder.exec_module(mod)
        except RefusedImport as err:
            raise WorkspaceError(str(err)) from err
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
        raise WorkspaceError(f"{path}: `task` lacks {missing}", hint=f"see {doc_ref('tasks')}")
    outdated = outdated_methods(task)
    if outdated:
        raise WorkspaceError(
            f"{path}: `task` has methods of the older task interface: " + "; ".join(outdated),
            hint=f"see {doc_ref('tasks', 'migrating-from-the-older-interface')}",
        )
    model = model or ModelSource()
    if isinstance(task, LoadsModel):
        task.use_model(model)
    elif model != ModelSource():
        raise WorkspaceError(
            f"the plan's model section (base: {model.base}, federated: {model.federated}) "
            f"is for a task that loads its model from disk, but {path}'s task is a "
            f"{type(task).__name__}",
            hint="use HFTask (fedloom.tasks.hf_task) for a pretrained base model, or remove "
            "the plan's model section (training.local keeps tensors at the sites)",
        )
    return task  # type: ignore[no-any-return]


def outdated_methods(task: object) -> list[str]:
    """The task's methods written against the interface before evaluate and the test
    set took a context: ``evaluate(weights, x, y)`` (now ``evaluate(weights, data,
    context)``, ``data`` a ``Split(x, y)`` or a dataset) and ``load_test_data()`` (now
    ``load_test_data(context)``). Found as the task loads, not after the last round."""
    found = []
    evaluate = _parameters(getattr(task, "evaluate", None))
    if evaluate is not None and [p.name for p in evaluate[1:3]] == ["x", "y"]:
        found.append(
            "evaluate(weights, x, y) now receives (weights, data, context): take "
            "`x, y = data` (a Split) and add the context parameter"
        )
    load_test = _parameters(getattr(task, "load_test_data", None))
    if load_test == []:
        found.append("load_test_data() now receives the context: load_test_data(context)")
    return found


def _parameters(method: object) -> list[inspect.Parameter] | None:
    """The positional parameters of a bound method (None when it has none to show, or
    takes ``*args``)."""
    if not callable(method):
        return None
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return [p for p in params if p.kind in kinds]
