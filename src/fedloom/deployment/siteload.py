"""A site's own data, loaded and checked before the site joins.

:func:`load_site_data` reads what ``--data`` names (through the task's data function,
or an ``.npz`` file: :func:`load_site_file`), or this site's share of the plan's
built-in dataset; :func:`check_site_data` refuses data the site could not train on.
"""

from __future__ import annotations

import logging
import traceback
import zipfile
from pathlib import Path

import numpy as np

from fedloom.core.errors import DataError, FedloomError, PlanError
from fedloom.core.rng import generator, int_seed
from fedloom.core.weights import read_only
from fedloom.data import train_val_split
from fedloom.plan import Plan
from fedloom.runtime.executor import SiteEnv, outside_rounds
from fedloom.runtime.sitedata import DataSource, classes_of, data_problems
from fedloom.tasks.base import (
    AnySiteData,
    ChecksData,
    LoadsData,
    SiteContext,
    SiteData,
    Split,
    Task,
    as_site_data,
)

log = logging.getLogger("fedloom.collaborator")


def load_site_data(
    ws: Path, plan: Plan, task: Task, name: str, data_path: Path | None, env: SiteEnv
) -> tuple[AnySiteData, int]:
    """The data of site ``name`` (``data_path``: what ``--data`` names; None: its
    share of the plan's built-in dataset) and its index in the roster (-1 if not in
    it), checked (:func:`check_site_data`) before the site joins."""
    index = plan.roster.index(name) if name in plan.roster else -1
    source = DataSource(plan, ws, task)
    if data_path is not None:
        own = None
        if isinstance(task, LoadsData):
            if not data_path.exists():
                raise DataError.of(str(data_path), ["no such file or folder"], hint=DATA_HINT)
            context = SiteContext(
                name,
                index,
                0,
                int_seed(plan.seed, 0, name, "data"),
                data_path=data_path,
                total_rounds=plan.rounds,
                device=env.device,
                state_dir=env.state_dir,
            )
            try:
                own = task.load_data(context)
            except FedloomError:
                raise
            except Exception as err:  # noqa: BLE001 - the task's own code, on this data
                log.error("the task's data function failed:\n%s", traceback.format_exc())
                why = traceback.format_exception_only(err)[-1].strip()
                raise DataError.of(
                    str(data_path),
                    [f"the task's data function failed on it: {why}"],
                    hint="fix the data or the task's data function (the traceback is in the "
                    "collaborator's log), then start the collaborator again",
                ) from err
        if own is not None:
            data = as_site_data(own, "the task's data function")
        else:
            data = load_site_file(data_path, plan, name)
        check_site_data(data, source, str(data_path), env)
        return data, index
    if index < 0:
        raise PlanError(
            [f"site {name!r} is not one of the plan's sites: {', '.join(plan.roster)}"],
            source=str(ws / "federation.yaml"),
        )
    data = source.site_data(name)
    if plan.data.dataset == "custom":  # the built-in shares are known to be good
        check_site_data(data, source, "the data the task's load_data returned", env)
    return data, index


DATA_HINT = (
    "--data takes what the task's data function reads (a file or a folder), or an .npz "
    "file (numpy.savez) with arrays x and y, or x_train, y_train, x_val, y_val"
)
SMOKE_ROWS = 8  # rows of the site's data the initial model is evaluated on at start


def check_site_data(data: AnySiteData, source: DataSource, where: str, env: SiteEnv) -> None:
    """Refuse data the site could not train on, before it joins: every problem
    :func:`data_problems` finds in arrays, then a smoke test: the plan's initial model
    run on one small batch of the site's data (the task's ``check_data`` when it has
    one, else its ``evaluate`` on a few rows). Raises :class:`DataError`."""
    problems = data_problems(data, classes_of(source)) if isinstance(data, SiteData) else []
    task = source.task
    if not problems:
        context = outside_rounds(source.plan, "smoke-check", env.device)
        try:
            weights = read_only(task.init_weights(source.plan.seed))
            if isinstance(task, ChecksData):
                task.check_data(weights, data, context)
            elif isinstance(data, SiteData):
                rows = data.val if data.num_val else data.train
                task.evaluate(weights, Split(rows.x[:SMOKE_ROWS], rows.y[:SMOKE_ROWS]), context)
        except Exception as err:  # noqa: BLE001 - the task's own code, on this data
            why = traceback.format_exception_only(err)[-1].strip()
            shape = ""
            if isinstance(data, SiteData):
                shape = f" (x_train rows have shape {data.x_train.shape[1:]})"
            problems.append(
                f"the model does not fit it: running the initial model on one batch of it "
                f"failed with {why}{shape}"
            )
    if problems:
        raise DataError.of(
            where,
            problems,
            hint=DATA_HINT + "; no data or model left this site: fix the data and start the "
            "collaborator again (it takes part again)",
        )


def load_site_file(path: Path, plan: Plan, site: str) -> SiteData:
    """A site's data from an ``.npz`` file: ``x`` and ``y`` (split into training and
    validation by the plan's ``data.val_fraction``), or ``x_train``, ``y_train``,
    ``x_val``, ``y_val``. Loaded with ``allow_pickle=False``."""
    if not path.is_file():
        raise DataError.of(
            str(path), ["no such file" if not path.exists() else "not a file"], hint=DATA_HINT
        )
    if path.stat().st_size == 0:
        raise DataError.of(str(path), ["the file is empty (0 bytes)"], hint=DATA_HINT)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"\x93NUM":
            raise DataError.of(
                str(path),
                ["it is a single .npy array, not an .npz archive"],
                hint="save the site's arrays with numpy.savez(path, x=x, y=y)",
            )
        if magic != b"PK\x03\x04":
            raise DataError.of(str(path), ["it is not an .npz archive"], hint=DATA_HINT)
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise DataError.of(str(path), [f"it cannot be read: {why}"], hint=DATA_HINT) from err
    if {"x_train", "y_train", "x_val", "y_val"} <= arrays.keys():
        return SiteData(arrays["x_train"], arrays["y_train"], arrays["x_val"], arrays["y_val"])
    if {"x", "y"} <= arrays.keys():
        x, y = arrays["x"], arrays["y"]
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
            shapes = f"x has shape {x.shape}, y {y.shape}"
            raise DataError.of(
                str(path),
                [f"x and y must have one row per sample each ({shapes})"],
                hint=DATA_HINT,
            )
        if len(y) == 0:
            raise DataError.of(
                str(path), ["x and y have 0 rows: there is nothing to train on"], hint=DATA_HINT
            )
        rng = generator(plan.seed, 0, site, "val-split")
        train, val = train_val_split(np.arange(len(y)), plan.data.val_fraction, rng)
        return SiteData(x[train], y[train], x[val], y[val])
    raise DataError.of(
        str(path),
        [f"it holds {sorted(arrays)}; expected x and y, or x_train, y_train, x_val, y_val"],
        hint=DATA_HINT,
    )
