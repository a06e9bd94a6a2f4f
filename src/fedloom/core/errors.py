"""fedloom's one error hierarchy.

Every error says what was wrong and what to do about it. Each class carries the exit
code the CLI maps it to, so scripts can tell a bad plan from a lost connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator


class FedloomError(Exception):
    """Base of every error fedloom raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"


class PlanError(FedloomError):
    """The plan (`federation.yaml` plus overrides) is invalid. Holds every problem found."""

    exit_code = 2

    def __init__(self, problems: list[str], *, source: str = "federation.yaml") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{source}: {count} {noun}\n{lines}")


class WorkspaceError(FedloomError):
    """A workspace folder is missing, incomplete or its task module cannot be loaded."""

    exit_code = 3


class DataError(WorkspaceError):
    """A site's local data cannot be used: its file cannot be read, or its arrays fail
    the checks made before the site joins (rows, shapes, NaN, labels). Holds every
    problem found."""

    def __init__(self, message: str, problems: list[str], *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.problems = list(problems)

    @classmethod
    def of(cls, where: str, problems: list[str], *, hint: str | None = None) -> DataError:
        """``where`` (the file) and every problem found in it, one per line."""
        if len(problems) == 1:
            return cls(f"the site's data {where}: {problems[0]}", problems, hint=hint)
        lines = "".join(f"\n  - {p}" for p in problems)
        return cls(f"the site's data {where}: {len(problems)} problems{lines}", problems, hint=hint)


class DeviceError(WorkspaceError):
    """The device a site asked for (``training.device``, ``--device``) is not on its
    machine."""


class TaskError(FedloomError):
    """The user's task code failed or returned something fedloom cannot use."""

    exit_code = 4


class TaskFailed(TaskError):
    """The task's own code raised, where it ran (a simulation's worker process, a site):
    the message is the exception's one line, ``traceback`` its formatted traceback
    (bounded: see :func:`fedloom.runtime.tracebacks.task_traceback`)."""

    def __init__(self, message: str, *, traceback: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.traceback = traceback


class UpdateRejected(FedloomError):
    """One site's update was refused (NaN, wrong shape or dtype, stale round …).

    Never fatal to the federation: it becomes a recorded failure for that site.
    """

    exit_code = 5


class TransportError(FedloomError):
    """A message could not be delivered, decoded or authorised."""

    exit_code = 6


class FederationCancelled(TransportError):
    """The aggregator's operator cancelled the federation (``fedloom aggregator stop
    --cancel``): its run is never resumed, and a collaborator told so stops."""


class AggregatorLost(TransportError):
    """The aggregator did not answer for as long as the collaborator was told to keep
    trying (``--give-up-after``)."""


class AggregationError(FedloomError):
    """A round could not be aggregated (for example, too few sites answered)."""

    exit_code = 7


class QuorumError(AggregationError):
    """Fewer sites answered than the plan's minimum fraction before the deadline."""


class StateError(FedloomError):
    """Persisted state (a checkpoint, a strategy state file) is missing or corrupt."""

    exit_code = 8


class FaultInjected(FedloomError):
    """Raised by a fault point that a test armed; never raised in normal operation."""

    exit_code = 9


class CertificateError(FedloomError):
    """A key, certificate, signing request or revocation list is missing, malformed, or
    does not belong to this federation."""

    exit_code = 10


class AccessDenied(TransportError):
    """The other side refused this party: a certificate from another CA, a revoked one,
    a site not in the plan, a name that differs from the certificate, another plan hash
    or protocol version."""

    exit_code = 11


class PolicyError(FedloomError):
    """The plan breaks the site's policy (``policy.yaml``), or the policy file itself is
    invalid. Holds every rule broken, each with what to change."""

    exit_code = 12


class AuditError(FedloomError):
    """A site's audit log was edited, reordered or cut short, or cannot be read."""

    exit_code = 13


class ModelRejected(TransportError):
    """A global model failed its signature check: it was not published, as received, by
    the federation's aggregator."""


class DiskError(FedloomError):
    """The environment refused a read or write: a read-only file system, a folder this
    user may not write, or a full disk. What was finished before is intact: the same
    command run again once the disk is fixed carries on (an aggregator resumes)."""

    exit_code = 14


class Cancelled(KeyboardInterrupt):
    """Raised in the aggregator's main thread when ``fedloom aggregator stop --cancel``
    asks it to end the federation for good: it stops as after Ctrl-C, but the run is
    recorded as cancelled (never resumed) and the sites are told it is over. Not a
    :class:`FedloomError`: like Ctrl-C, it is an order, not a failure."""


NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY = frozenset({errno.EROFS})
NO_PERMISSION = frozenset({errno.EACCES, errno.EPERM})
DISK_ERRNOS = NO_SPACE | READ_ONLY | NO_PERMISSION

_AGAIN = "then run the same command again: what was finished is intact, and an aggregator resumes"


def disk_error(err: OSError, path: str | os.PathLike[str] | None = None) -> DiskError | None:
    """``err`` as a :class:`DiskError` naming the path and what to do, when it is a
    read-only file system, a permission refused or a full disk; None otherwise."""
    where = path if path is not None else (err.filename or err.filename2)
    at = f" {os.fsdecode(where)}" if where is not None else ""
    if err.errno in NO_SPACE:
        return DiskError(
            f"no space left on the disk of{at or ' a file fedloom writes'}",
            hint=f"free space on that disk (df -h shows it), {_AGAIN}",
        )
    if err.errno in READ_ONLY:
        return DiskError(
            f"cannot write{at}: it is on a read-only file system",
            hint=f"remount it read-write, or work in a writable copy of it, {_AGAIN}",
        )
    if err.errno in NO_PERMISSION:
        return DiskError(
            f"permission denied:{at or ' a file fedloom needs'} cannot be written (or read) "
            f"by this user (uid {os.getuid()})",
            hint=f"give this user access to it (or run as the workspace's owner), {_AGAIN}",
        )
    return None


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError without a file name (a write or flush the disk refused) raised inside
    gets ``path`` as its file name, so the error the user sees can name it."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, os.fspath(path)) from err
