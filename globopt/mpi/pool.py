"""Rank 0's scheduler logic: hand tasks to idle worker ranks, collect results, detect dead ranks.

``globopt.scheduler.MPIScheduler`` wraps :class:`WorkerPool`, so the engine cannot tell MPI from the local
pool. Steady state: a result frees a slot on its rank and the engine hands that rank the next candidate
at once; there is no generation barrier. A rank has one slot, or ``relax.batch_size`` slots when it relaxes
a batch (it says how many when its potential is loaded: READY); capacity = the slots of the live ranks.

Rank 0 notices a dead rank by its silence: a busy worker sends a heartbeat at most every
:data:`HEARTBEAT_INTERVAL` seconds from inside the relaxation, and a busy rank silent for
:data:`HEARTBEAT_TIMEOUT` seconds (``GLOBOPT_MPI_HEARTBEAT_TIMEOUT``) is declared dead: its candidate
comes back from ``collect()`` as ``worker_died`` (the engine re-issues it) and it gets no more work; a
batching rank takes every candidate it held with it. A result that arrives later from such a rank is
dropped: a result is accepted only for a task currently assigned to the rank that sends it, so no candidate
can be committed twice. (How a worker rank's death
is kept from killing the whole job is in :mod:`globopt.mpi.launch`.)
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from globopt.mpi import master as _master
from globopt.mpi.master import WorkersLost
from globopt.mpi.protocol import (
    HEARTBEAT_INTERVAL,
    MASTER_MAX_POLL,
    PING_INTERVAL,
    STARTUP_TIMEOUT,
    Tag,
    WorkerFailure,
    WorkerReady,
    WorkerStats,
    _Backoff,
    _cpu_seconds,
    heartbeat_timeout,
)

if TYPE_CHECKING:
    from globopt.candidate import Evaluation, RelaxTask
    from globopt.evaluator.evaluate import EvaluatorSettings

log = logging.getLogger("globopt")


@dataclass
class _Assignment:
    """The tasks on a rank (by candidate id), and when rank 0 last heard from that rank (or handed it one).

    Silence is judged only right after every queued message has been received: while the engine
    screens candidates or commits, heartbeats queue up unread, and a rank must not be declared dead
    for rank 0's own absence.
    """

    tasks: dict[int, RelaxTask] = field(default_factory=dict)
    heard: float = field(default_factory=time.monotonic)


@dataclass
class _PoolStats:
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=lambda: _cpu_seconds())
    waiting: float = 0.0  # inside collect(): rank 0 is free for the workers, or handling their messages
    protocol: float = 0.0  # sending tasks, receiving and handling messages: this module's cost on rank 0
    completed: int = 0  # evaluations that used the potential
    compared_only: int = 0  # tasks their worker found to be duplicates before relaxing


class WorkerPool:
    """Rank 0's scheduler logic: hand tasks to idle worker ranks, collect results, detect dead ranks."""

    def __init__(self, settings: EvaluatorSettings) -> None:
        active = _master._MASTER  # read at call time: set once per process by _run_master (or a test)
        if active is None or active.released:
            raise RuntimeError("the MPI worker ranks are not available (not rank 0, or already released)")
        self.master = active
        self.settings = settings
        self.timeout = heartbeat_timeout()
        self.interval = min(HEARTBEAT_INTERVAL, self.timeout / 4)
        self.assigned: dict[int, _Assignment] = {}  # ranks holding at least one task
        self.ready: dict[int, WorkerReady] = {}
        self.idle: deque[int] = deque()  # ranks with a free slot, in the order they got one
        # Tasks accepted while every rank was busy; the next rank to finish gets one at once, inside
        # collect(), without waiting for rank 0 to commit the result and screen a new candidate.
        self.queued: deque[RelaxTask] = deque()
        self.lost: list[tuple[RelaxTask, Evaluation]] = []
        self.stats = _PoolStats()
        for rank in self.master.workers:
            if rank in self.master.gone:
                continue
            configured = rank in self.master.configured
            if configured or self.master.send(rank, Tag.SETTINGS, (settings, self.interval)):
                self.master.configured.add(rank)
                self.idle.append(rank)
            else:
                self._declare_gone(rank, dead=True)
        log.info(
            "MPI: %d worker rank(s) relax candidates, rank 0 searches (config 'workers' does not apply); "
            "a dead worker rank is survived only under `mpiexec -disable-auto-cleanup` (MPICH), "
            "and declared dead after %.0f s of silence",
            len(self.idle),
            self.timeout,
        )

    def slots(self, rank: int) -> int:
        """Candidates a rank relaxes at once: 1 until its READY says more (a batching rank)."""
        ready = self.ready.get(rank)
        return max(1, ready.slots) if ready is not None else 1

    @property
    def capacity(self) -> int:
        return sum(self.slots(r) for r in self.master.workers if r not in self.master.gone)

    @property
    def live_ranks(self) -> int:
        return len([r for r in self.master.workers if r not in self.master.gone])

    @property
    def in_flight(self) -> int:
        held = sum(len(a.tasks) for a in self.assigned.values())
        return held + len(self.queued) + len(self.lost)

    def submit(self, task: RelaxTask) -> None:
        """Hand the task to an idle rank, or queue it for the next rank that finishes."""
        started = time.perf_counter()
        try:
            if not self._send_to_idle_rank(task):
                self.queued.append(task)
                self._check_alive()
        finally:
            self.stats.protocol += time.perf_counter() - started

    def _send_to_idle_rank(self, task: RelaxTask) -> bool:
        while self.idle:
            rank = self.idle.popleft()
            if rank in self.master.gone:
                continue
            if self.master.send(rank, Tag.TASK, task):
                assignment = self.assigned.get(rank)
                if assignment is None:
                    assignment = self.assigned[rank] = _Assignment()
                assignment.tasks[task.candidate_id] = task
                if len(assignment.tasks) < self.slots(rank):
                    self.idle.appendleft(rank)  # fill a batching rank before the next one
                return True
            self._declare_gone(rank, dead=True)
        return False

    def _free_slot(self, rank: int) -> None:
        """A task left the rank: it has room again (once in ``idle``, however many slots are free)."""
        assignment = self.assigned.get(rank)
        if assignment is not None and not assignment.tasks:
            del self.assigned[rank]
        if rank not in self.master.gone and rank not in self.idle:
            self.idle.append(rank)

    def _dispatch_queued(self) -> None:
        while self.queued and self.idle:
            if not self._send_to_idle_rank(self.queued[0]):
                break
            self.queued.popleft()

    def collect(self) -> list[tuple[RelaxTask, Evaluation]]:
        finished, self.lost = self.lost, []
        self._dispatch_queued()
        if not self.assigned:
            return finished
        backoff = _Backoff(MASTER_MAX_POLL)
        waited_from = time.perf_counter()
        while True:
            handling = time.perf_counter()
            received = self.master.receive_all()
            for message in received:
                finished += self._handle(*message)
            finished += self._check_silence()
            self._dispatch_queued()  # a rank that just finished starts its next task before rank 0 commits
            if received:
                self.stats.protocol += time.perf_counter() - handling
            if finished or not self.assigned:
                break
            self._ping_idle()
            backoff.sleep()
        self.stats.waiting += time.perf_counter() - waited_from
        self.stats.completed += sum(
            1 for _, e in finished if e.status.used_potential and e.status != "worker_died"
        )
        self.stats.compared_only += sum(1 for _, e in finished if e.status == "duplicate")
        self._check_alive()
        return finished

    def close(self) -> None:
        """Release the workers: this process will not need them again (the engine closes at its end)."""
        self.master.release()
        self._log_summary()

    # -- internals ------------------------------------------------------------------------------------
    def _handle(self, rank: int, tag: Tag, payload: Any) -> list[tuple[RelaxTask, Evaluation]]:
        assignment = self.assigned.get(rank)
        if rank in self.master.gone:
            log.debug("ignoring %s from MPI rank %d: declared dead or stopped", tag.name, rank)
            return []
        if assignment is not None:
            assignment.heard = time.monotonic()
        if tag is Tag.READY:
            self.ready[rank] = payload
            log.debug(
                "MPI worker rank %d (%s) ready after %.1f s, %d torch thread(s), %d candidate(s) at once",
                rank, payload.label, payload.seconds, payload.torch_threads, payload.slots,
            )  # fmt: skip
            held = len(assignment.tasks) if assignment is not None else 0
            if held < self.slots(rank) and rank not in self.idle:
                self.idle.append(rank)
        elif tag is Tag.RESULT:
            candidate_id, attempt, evaluation = payload
            task = None if assignment is None else assignment.tasks.get(candidate_id)
            if task is None or task.attempt != attempt:
                log.debug("rank %d: result for candidate %d is not its task; ignored", rank, candidate_id)
                return []
            del assignment.tasks[candidate_id]
            self._free_slot(rank)
            return [(task, evaluation)]
        elif tag is Tag.ERROR:
            failure: WorkerFailure = payload
            exc = failure.exception
            label = self.ready[rank].label if rank in self.ready else "starting"
            exc.add_note(f"raised on MPI worker rank {rank} ({label}):\n{failure.traceback}")
            raise exc
        elif tag is Tag.BYE:
            stats: WorkerStats = payload
            self.master.stats[rank] = stats
            self._declare_gone(rank, dead=False)
            self.master.stop(rank)  # the acknowledgement it waits for before leaving
            log.warning("MPI worker rank %d (%s) stopped: %s", rank, stats.label, stats.reason)
            if assignment is not None:
                del self.assigned[rank]
                reason = f"MPI worker rank {rank} ({stats.label}) stopped ({stats.reason})"
                return [(task, _died(task, reason)) for task in assignment.tasks.values()]
        return []

    def _check_silence(self) -> list[tuple[RelaxTask, Evaluation]]:
        lost = []
        now = time.monotonic()
        for rank, assignment in list(self.assigned.items()):
            limit = self.timeout if rank in self.ready else max(self.timeout, STARTUP_TIMEOUT)
            silent = now - assignment.heard
            if silent <= limit:
                continue
            label = self.ready[rank].label if rank in self.ready else "still starting"
            ids = ", ".join(str(i) for i in assignment.tasks)
            log.warning(
                "MPI worker rank %d (%s) silent for %.0f s while relaxing candidate(s) %s: declared dead "
                "(killed, out of memory or hung); it gets no more work, its candidates are re-issued",
                rank, label, silent, ids,
            )  # fmt: skip
            del self.assigned[rank]
            self._declare_gone(rank, dead=True)
            reason = f"MPI worker rank {rank} ({label}) died (killed, out of memory or hung)"
            lost += [(task, _died(task, reason)) for task in assignment.tasks.values()]
        return lost

    def _ping_idle(self) -> None:
        now = time.monotonic()
        for rank in self.idle:
            if rank in self.assigned:  # busy, with a free slot: its heartbeats show it is alive
                continue
            if rank not in self.master.gone and now - self.master.last_sent.get(rank, now) > PING_INTERVAL:
                self.master.send(rank, Tag.PING)

    def _declare_gone(self, rank: int, dead: bool) -> None:
        self.master.gone.add(rank)
        if dead:
            self.master.dead.add(rank)
        if rank in self.idle:
            self.idle.remove(rank)

    def _check_alive(self) -> None:
        if self.capacity == 0:
            raise WorkersLost(
                f"all {len(self.master.workers)} MPI worker rank(s) are gone (killed, out of memory or "
                "stopped); committed results are kept: resume the run"
            )

    def _log_summary(self) -> None:
        """Where the time went, for users sizing a job (benchmarks/mpi_overhead.py parses this line)."""
        if not self.stats.completed:
            return
        wall = time.perf_counter() - self.stats.started
        cpu = _cpu_seconds() - self.stats.cpu_started
        done = max(self.stats.completed, 1)
        workers = list(self.master.stats.values())
        worker_wall = sum(s.wall for s in workers) or 1e-9

        def share(name: str) -> float:
            return 100 * sum(getattr(s, name) for s in workers) / worker_wall

        log.info(
            "MPI: %d evaluations on %d worker rank(s) in %.1f s; worker time: relaxing %.1f%%, idle between "
            "tasks %.1f%%, waiting for the end %.1f%%, starting up %.1f%%; rank 0 per evaluation: %.2f ms "
            "busy outside collect, %.2f ms CPU, %.3f ms in the MPI layer; rank 0 used %.1f%% of one core; "
            "%d more task(s) were duplicates their worker found before relaxing",
            self.stats.completed, len(self.master.workers), wall, share("busy"), share("idle"),
            share("tail"), share("startup"), 1000 * (wall - self.stats.waiting) / done,
            1000 * cpu / done, 1000 * self.stats.protocol / done, 100 * cpu / max(wall, 1e-9),
            self.stats.compared_only,
        )  # fmt: skip


def _died(task: RelaxTask, reason: str) -> Evaluation:
    from globopt.candidate import Evaluation, Status

    return Evaluation(candidate_id=task.candidate_id, status=Status.WORKER_DIED, reason=reason)
