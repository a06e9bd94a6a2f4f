"""The replies of the simulation's workers, as the caller reads them: a failure carried
across the process boundary and raised again as fedloom's own error, a batch's answers
site by site, and how long a request may take before its worker is replaced.
"""

from __future__ import annotations

from typing import Any

from fedloom.core.errors import (
    DeviceError,
    FedloomError,
    PlanError,
    TaskError,
    TaskFailed,
    WorkspaceError,
)
from fedloom.core.records import SiteAnswer
from fedloom.core.weights import Weights
from fedloom.runtime.tracebacks import one_line, task_traceback

Reply = tuple[dict[str, Any], Weights | None]


def _describe(err: BaseException) -> str:
    if isinstance(err, PlanError):
        return "\n".join(err.problems)
    if isinstance(err, FedloomError):
        return str(err)
    return one_line(err)


_ERROR_KINDS: dict[str, type[FedloomError]] = {
    cls.__name__: cls for cls in (PlanError, WorkspaceError, DeviceError, TaskError, FedloomError)
}


def error_reply(err: BaseException) -> dict[str, Any]:
    """The reply saying a request failed with ``err``: its one-line description, its
    kind and, for the task's own failure, its traceback (bounded: the driver writes it
    to the run's log and the failure's record)."""
    kind = type(err).__name__ if type(err).__name__ in _ERROR_KINDS else "TaskError"
    reply = {"ok": False, "error": _describe(err), "kind": kind}
    if isinstance(err, PlanError):
        reply["source"] = err.source
    if kind == "TaskError":
        reply["traceback"] = err.traceback if isinstance(err, TaskFailed) else task_traceback(err)
    return reply


def raise_reply_error(header: dict[str, Any], doing: str) -> None:
    """Re-raise, in the caller's process, the error a worker reported."""
    if header.get("ok"):
        return
    cls = _ERROR_KINDS.get(str(header.get("kind")), TaskError)
    text = str(header.get("error"))
    if cls is PlanError:
        raise PlanError(text.split("\n"), source=str(header.get("source", doing)))
    if cls is TaskError:
        raise TaskFailed(f"{doing}: {text}", traceback=str(header.get("traceback", "")))
    raise cls(f"{doing}: {text}")


def request_timeout(per_site: float | None, header: dict[str, Any]) -> float | None:
    """How long a request may take: ``per_site`` seconds for each site it carries."""
    if per_site is None:
        return None
    return per_site * max(1, len(header.get("sites", ())))


def no_answer(timeout: float, header: dict[str, Any], replaced: str) -> str:
    """Why a request past its :func:`request_timeout` failed."""
    sites = len(header.get("sites", ()))
    each = "" if sites <= 1 else f", for each of the request's {sites} sites"
    return (
        f"the site's task gave no answer within {timeout:g} s (the round's deadline{each}); "
        f"{replaced} was replaced"
    )


class WorkerDied(FedloomError):
    """A worker process ended while serving a request."""


def answers_from_batch_reply(reply: Reply, count: int) -> list[SiteAnswer | BaseException]:
    """Each site's answer to a batch ``run`` request, or the error it failed with."""
    header, tensors = reply
    raise_reply_error(header, "the sites' local work failed")
    answers = header["answers"]
    if len(answers) != count:
        raise TaskError(f"a worker answered {len(answers)} of {count} sites")
    deltas: list[Weights] = [{} for _ in answers]
    for key, array in (tensors or {}).items():
        position, name = key.split("/", 1)
        deltas[int(position)][name] = array
    out: list[SiteAnswer | BaseException] = []
    for answer, delta in zip(answers, deltas, strict=True):
        if not answer.get("ok"):  # the site reports it; the round goes on
            trace = str(answer.get("traceback", ""))
            out.append(TaskFailed(str(answer.get("error")), traceback=trace))
        else:
            steps = answer.get("local_steps")
            out.append(
                SiteAnswer(
                    int(answer["num_samples"]),
                    answer["metrics"],
                    delta or None,
                    None if steps is None else int(steps),
                )
            )
    return out
