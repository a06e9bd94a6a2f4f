"""Simulated sites' local work, handed to the workers in batches.

A request to a worker process costs a round trip (two context switches, a JSON header,
often a wait for a busy core) whatever the site does. With a small model that is most
of a site's cost, so each worker's thread takes every site waiting, up to ``batch``,
and sends them in one request: the round trip is paid once per batch. The model goes
to each worker once per round, not once per site. A large model gains nothing from
batching but loses nothing either: its sites' training dominates.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from fedloom.core.errors import TaskError
from fedloom.core.records import Instruction, SiteAnswer
from fedloom.core.weights import Weights
from fedloom.simulation.replies import WorkerDied, answers_from_batch_reply
from fedloom.simulation.worker import Worker
from fedloom.simulation.workerops import WorkerOp, instruction_to_json, request


@dataclass
class _Job:
    site: str
    instruction: Instruction
    weights: Weights
    done: Future[SiteAnswer] = field(default_factory=Future)

    @property
    def key(self) -> str:  # every site given the same task gets the same model
        return (
            f"{self.instruction.kind.value}:{self.instruction.round}:{self.instruction.attempt_id}"
        )


MAX_BATCH = 16
BATCH_BYTES = 32 * 1024 * 1024  # a batch's updates held at once: at most about this much


def batch_size(per_round: int, workers: int, model_bytes: int) -> int:
    """Sites per request: a round's sites spread over the workers about four requests
    each (so the folding of one batch overlaps the next), at most :data:`MAX_BATCH`, and
    no more updates than fit :data:`BATCH_BYTES` (a large model's sites go one by one:
    their training dominates, and memory stays flat)."""
    by_bytes = BATCH_BYTES // max(1, model_bytes)
    return max(1, min(MAX_BATCH, by_bytes, per_round // (4 * max(1, workers))))


class Dispatcher:
    """Runs sites' local work on ``workers``, up to ``batch`` sites per request.

    ``open_task(attempt_id)`` says whether an attempt still takes answers: a site queued for
    one that has closed (at its deadline, or for a retry) is failed at once instead of
    trained, so stale work never delays the next attempt. A batch whose worker died or
    hung is run again one site at a time, so only the culprit fails."""

    def __init__(
        self,
        workers: list[Worker],
        batch: int,
        open_task: Callable[[str], bool],
        *,
        in_caller: bool = False,
    ) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._batch = max(1, batch)
        self._open_task = open_task
        self._aborted = False
        self._lock = threading.Lock()  # abort() against run() queueing a job
        # in_caller: the one worker is served by serve_here(), in the thread that calls it
        self._here = workers[0] if in_caller else None
        served = [] if in_caller else workers
        self._threads = [
            threading.Thread(target=self._serve, args=(w,), name="fedloom-worker", daemon=True)
            for w in served
        ]
        for t in self._threads:
            t.start()

    def run(self, site: str, instruction: Instruction, weights: Weights) -> SiteAnswer:
        """The site's answer (blocks until a worker has run it); raises what it raised."""
        job = _Job(site, instruction, weights)
        with self._lock:
            if self._aborted:
                raise WorkerDied("the simulation is shutting down")
            self._jobs.put(job)
        return job.done.result()

    def serve_here(self) -> None:
        """Run the queued sites' work in this thread until :meth:`stop_serving` (with
        ``in_caller``: ``--workers 0`` runs every task in the main thread, where a
        debugger can stop in it). Ctrl-C in a task fails the jobs taken and is raised."""
        if self._here is not None:
            self._serve(self._here)

    def stop_serving(self) -> None:
        """Make :meth:`serve_here` return once the jobs already queued are done."""
        if self._here is not None:
            self._jobs.put(None)

    def abort(self) -> None:
        """Fail every queued job at once (the run stopped); the workers are aborted too."""
        with self._lock:
            self._aborted = True
            if self._here is not None:  # no thread of ours takes them: fail them here
                while True:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        job.done.set_exception(WorkerDied("the simulation is shutting down"))

    def close(self) -> None:
        """Stop the workers' threads once the jobs already queued are done."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()

    def _serve(self, worker: Worker) -> None:
        sent: str | None = None  # the model this worker holds
        held: _Job | None = None  # taken from the queue, for the next batch
        while True:
            first = held if held is not None else self._jobs.get()
            held = None
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self._batch:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)  # give the stop back: this thread ends next
                    break
                if more.key != first.key:
                    held = more  # another task's site starts the next batch
                    break
                jobs.append(more)
            jobs = self._still_wanted(jobs)
            if not jobs:
                continue
            try:
                answers = self._call(worker, jobs, jobs[0].weights if jobs[0].key != sent else None)
                sent = jobs[0].key
            except WorkerDied as err:
                sent = None  # a restarted worker holds no model
                if len(jobs) == 1 or self._aborted:
                    answers = [err] * len(jobs)
                else:
                    answers = [self._alone(worker, job) for job in jobs]  # find the culprit
            except KeyboardInterrupt:  # Ctrl-C in a task run here, in the main thread
                for job in jobs:
                    job.done.set_exception(WorkerDied("the simulation was interrupted"))
                raise
            except BaseException as err:
                sent = None
                answers = [err] * len(jobs)
            for job, answer in zip(jobs, answers, strict=True):
                if isinstance(answer, BaseException):
                    job.done.set_exception(answer)
                else:
                    job.done.set_result(answer)

    def _still_wanted(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs worth running; the others fail now (run stopped, attempt closed)."""
        wanted = []
        for job in jobs:
            if self._aborted:
                job.done.set_exception(WorkerDied("the simulation is shutting down"))
            elif not self._open_task(job.instruction.attempt_id):
                job.done.set_exception(
                    TaskError(f"round {job.instruction.round} closed before its turn came")
                )
            else:
                wanted.append(job)
        return wanted

    def _alone(self, worker: Worker, job: _Job) -> SiteAnswer | BaseException:
        try:
            (answer,) = self._call(worker, [job], job.weights)
        except BaseException as err:
            return err
        return answer

    @staticmethod
    def _call(
        worker: Worker, jobs: list[_Job], weights: Weights | None
    ) -> list[SiteAnswer | BaseException]:
        header = request(
            WorkerOp.RUN,
            key=jobs[0].key,
            sites=[j.site for j in jobs],
            instructions=[instruction_to_json(j.instruction) for j in jobs],
        )
        return answers_from_batch_reply(worker.call(header, weights), len(jobs))
