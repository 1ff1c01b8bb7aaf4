"""Where relaxations run. The engine sees only submit / collect; this module alone knows the backend.

Steady-state: the engine keeps every worker busy by submitting a new task as soon as ``collect``
returns a finished one; there is no generation barrier.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from abc import ABC, abstractmethod
from concurrent.futures.process import BrokenProcessPool

from globopt.candidate import Evaluation, RelaxTask, Status
from globopt.evaluator.evaluate import EvaluatorSettings, evaluate_task, prepare_worker


class Scheduler(ABC):
    # whether tasks run in other processes: only then is it worth asking workers to build random
    # structures for rank 0 (RelaxTask.generate); in-process it would cost the same time either way
    runs_elsewhere = False
    capacity: int

    @abstractmethod
    def submit(self, task: RelaxTask) -> None: ...

    @abstractmethod
    def collect(self) -> list[tuple[RelaxTask, Evaluation]]:
        """Block until at least one task finishes; return the finished ones.

        A task whose worker died comes back with status WORKER_DIED; the engine decides whether to
        re-issue it.
        """

    @property
    @abstractmethod
    def in_flight(self) -> int: ...

    def close(self) -> None:  # noqa: B027 - nothing to release for the serial backend
        """Release workers."""


class SerialScheduler(Scheduler):
    """Relax in this process (workers: 1): one at a time, or a batch when the potential batches.

    No pickling, no start-up cost. With a batching potential the capacity is the batch size, and collect()
    advances the whole batch step by step until at least one candidate finishes.
    """

    def __init__(self, settings: EvaluatorSettings) -> None:
        from globopt.evaluator.batch_evaluate import BatchEvaluator, worker_limits

        self.settings = settings
        self._queue: list[RelaxTask] = []
        prepare_worker(settings)
        limits = worker_limits(settings)
        self.capacity = limits.structures
        self._batch = BatchEvaluator(settings, limits) if limits.batched else None

    def submit(self, task: RelaxTask) -> None:
        if self._batch is not None:
            self._batch.submit(task)
        else:
            self._queue.append(task)

    def collect(self) -> list[tuple[RelaxTask, Evaluation]]:
        if self._batch is None:
            task = self._queue.pop(0)
            return [(task, evaluate_task(task, self.settings))]
        while len(self._batch):
            finished = self._batch.step()
            if finished:
                return finished
        return []

    @property
    def in_flight(self) -> int:
        return len(self._batch) if self._batch is not None else len(self._queue)


class ProcessPoolScheduler(Scheduler):
    """A pool of local worker processes, each loading the potential once and using its share of cores."""

    runs_elsewhere = True

    def __init__(self, settings: EvaluatorSettings, workers: int) -> None:
        self.settings = settings
        self.capacity = workers
        self.threads_per_worker = max(1, (os.cpu_count() or 1) // workers)
        self._futures: dict[cf.Future, RelaxTask] = {}
        self._lost: list[tuple[RelaxTask, Evaluation]] = []
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        # spawn, not fork: forking a process that has torch (and its thread pools) loaded is unsafe.
        return cf.ProcessPoolExecutor(
            max_workers=self.capacity,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=prepare_worker,
            initargs=(self.settings, self.threads_per_worker),
        )

    def submit(self, task: RelaxTask) -> None:
        try:
            future = self._pool.submit(evaluate_task, task, self.settings)
        except BrokenProcessPool:  # a worker died since the last collect()
            self._restart_pool()
            future = self._pool.submit(evaluate_task, task, self.settings)
        self._futures[future] = task

    def collect(self) -> list[tuple[RelaxTask, Evaluation]]:
        finished, self._lost = self._lost, []
        if finished and not self._futures:
            return finished
        done, _ = cf.wait(list(self._futures), return_when=cf.FIRST_COMPLETED)
        pool_broken = False
        for future in done:
            task = self._futures.pop(future)
            try:
                finished.append((task, future.result()))
            except BrokenProcessPool:
                pool_broken = True
                finished.append((task, _worker_died(task)))
        if pool_broken:
            self._restart_pool()
            finished += self._lost
            self._lost = []
        return finished

    def _restart_pool(self) -> None:
        """A dead worker breaks the whole pool: every task in it is lost and handed back as died."""
        for future, task in list(self._futures.items()):
            self._lost.append((task, _worker_died(task)))
            del self._futures[future]
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()

    @property
    def in_flight(self) -> int:
        return len(self._futures) + len(self._lost)

    def close(self) -> None:
        """Release the workers. Tasks still running here are abandoned (the engine closes the pool with
        work in flight only when it was interrupted; a resume re-issues them), so their processes are ended
        rather than waited for: a relaxation may take minutes, and SIGTERM must end the run now."""
        if any(not future.done() for future in self._futures):
            for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                process.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _worker_died(task: RelaxTask) -> Evaluation:
    # The pool cannot tell which of its processes died, so every task it held is reported the same way.
    reason = "worker process died (killed or out of memory) or its pool was restarted"
    return Evaluation(candidate_id=task.candidate_id, status=Status.WORKER_DIED, reason=reason)


class MPIScheduler(Scheduler):
    """The worker ranks of an ``mpiexec`` launch, seen from rank 0 (the protocol is in globopt/mpi/).

    capacity is the slots of the live worker ranks (one each, or relax.batch_size on a batching rank)
    plus one task queued per rank, so a rank that finishes starts its next task at once instead of waiting
    while rank 0 commits the result and screens a new candidate. It shrinks when a rank dies; a dead rank's
    tasks come back from collect() as WORKER_DIED like a dead pool process's.
    """

    QUEUED_PER_RANK = 1
    runs_elsewhere = True

    def __init__(self, settings: EvaluatorSettings) -> None:
        from globopt.mpi import WorkerPool

        self._pool = WorkerPool(settings)
        self._update_capacity()

    def _update_capacity(self) -> None:
        self.capacity = self._pool.capacity + self._pool.live_ranks * self.QUEUED_PER_RANK

    def submit(self, task: RelaxTask) -> None:
        self._pool.submit(task)
        self._update_capacity()

    def collect(self) -> list[tuple[RelaxTask, Evaluation]]:
        finished = self._pool.collect()
        self._update_capacity()
        return finished

    @property
    def in_flight(self) -> int:
        return self._pool.in_flight

    def close(self) -> None:
        self._pool.close()


def make_scheduler(settings: EvaluatorSettings, workers: int) -> Scheduler:
    from globopt import mpi

    if mpi.master_active():  # rank 0 of an mpiexec launch: the worker ranks relax, `workers` is moot
        return MPIScheduler(settings)
    return SerialScheduler(settings) if workers == 1 else ProcessPoolScheduler(settings, workers)
