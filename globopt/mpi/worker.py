"""The loop of worker ranks 1..N-1: settings once, then tasks until rank 0 says stop.

Worker ranks receive ``EvaluatorSettings`` once, load the potential once (``prepare_worker``), then
loop: task -> ``evaluate`` -> result, until rank 0 says stop. With a potential that batches, a rank holds
up to ``relax.batch_size`` candidates (it tells rank 0 how many in READY) and loops instead: take whatever
tasks have arrived, advance every relaxation by one batched step, send the results that finished. A busy
worker sends heartbeats and looks for a stop request after every optimiser step; an idle one gives up
when rank 0 stays silent for MASTER_SILENCE_TIMEOUT. Whatever ends the loop, the rank says BYE with its
statistics and takes rank 0's one STOP before it leaves (see :func:`globopt.mpi.launch._finalize`).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from globopt.mpi.protocol import (
    HEARTBEAT_INTERVAL,
    MASTER_SILENCE_TIMEOUT,
    RELEASE_TIMEOUT,
    STOP_CHECK_INTERVAL,
    WORKER_MAX_POLL,
    Tag,
    WorkerFailure,
    WorkerReady,
    WorkerStats,
    _Backoff,
    _cpu_seconds,
    _raise_terminated,
    _Terminated,
    drain,
)

if TYPE_CHECKING:
    from globopt.candidate import RelaxTask
    from globopt.evaluator.batch_evaluate import BatchEvaluator
    from globopt.evaluator.evaluate import EvaluatorSettings


class _StopRequested(BaseException):
    """Rank 0 asked a busy worker to stop; a BaseException so relax() cannot record it as a failure."""


class _MasterSilent(Exception):
    """An idle worker heard nothing from rank 0 for MASTER_SILENCE_TIMEOUT."""


class _Worker:
    """A worker rank: settings once, then tasks until STOP. Exits 0; failures are reported via rank 0."""

    def __init__(self, comm: Any, threads: int) -> None:
        from mpi4py import MPI

        from globopt.evaluator.evaluate import worker_label

        self.MPI = MPI
        self.comm = comm
        self.threads = threads
        self.settings: EvaluatorSettings | None = None
        self.batch: BatchEvaluator | None = None  # set when the potential batches (relax.batch_size > 1)
        self.interval = HEARTBEAT_INTERVAL
        self.stats = WorkerStats(label=worker_label(), torch_threads=threads)
        self.started = time.perf_counter()
        self._outbox: list[Any] = []
        self._heartbeat: Any = None
        self._last_beat = 0.0
        self._next_stop_check = 0.0
        self._task_id: int | None = None
        self._stopped = False  # received rank 0's one STOP (nothing else will come after it)
        self._status = MPI.Status()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            self._serve()
        except _StopRequested:
            self.stats.reason = "stopped by rank 0 while relaxing"
        except KeyboardInterrupt:
            self.stats.reason = "interrupted (SIGINT)"
        except _Terminated:
            self.stats.reason = "terminated (SIGTERM)"
        except _MasterSilent:
            self._stopped = True  # no STOP will come: do not wait for one
            self.stats.reason = f"rank 0 silent for {MASTER_SILENCE_TIMEOUT:.0f} s"
            print(f"globopt: MPI worker {self.stats.label}: {self.stats.reason}; exiting", file=sys.stderr)
        except Exception as exc:  # a bug in this loop: rank 0 raises it, this rank leaves cleanly
            self.stats.reason = f"internal error {type(exc).__name__}"
            self._report(exc)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the goodbye short
                signal.signal(sig, signal.SIG_IGN)
            self._say_bye()
        return 0

    def _serve(self) -> None:
        idle_since = time.perf_counter()
        while True:
            if self.batch is not None and len(self.batch):
                if self._batch_step():
                    return
                idle_since = time.perf_counter()
                continue
            tag, payload = self._receive()
            now = time.perf_counter()
            if tag is Tag.STOP:
                self._stopped = True
                if self.stats.tasks:
                    self.stats.tail += now - idle_since
                return
            if tag is Tag.SETTINGS:
                self._configure(*payload)
            elif tag is Tag.TASK:
                if self.stats.tasks:
                    self.stats.idle += now - idle_since
                if self.batch is not None:
                    self.batch.submit(payload)
                else:
                    self._evaluate(payload)
            idle_since = time.perf_counter()

    def _batch_step(self) -> bool:
        """Take the tasks that arrived, advance the batch by one step, send what finished; True on STOP.

        STOP abandons the candidates in flight: they are pending in the archive and a resume re-issues them.
        """
        for message in drain(self.comm, 0, self._status):
            tag = Tag(self._status.Get_tag())
            payload = self._take(message)
            if tag is Tag.STOP:
                self._stopped = True
                return True
            if tag is Tag.TASK:
                self.batch.submit(payload)
        started = time.perf_counter()
        try:
            finished = self.batch.step()
        except Exception as exc:
            self._report(exc)
            self.batch = None  # rank 0 raises the error; nothing more is relaxed here
            return False
        finally:
            self.stats.busy += time.perf_counter() - started
        for task, evaluation in finished:
            self.stats.tasks += 1
            self._send(Tag.RESULT, (task.candidate_id, task.attempt, evaluation))
        self._beat()
        return False

    def _beat(self) -> None:
        """A heartbeat for a batching rank, at most one per interval (payload: the candidates it holds)."""
        now = time.monotonic()
        if now - self._last_beat >= self.interval and (self._heartbeat is None or self._heartbeat.Test()):
            held = [t.candidate_id for t in self.batch.tasks()] if self.batch is not None else []
            self._heartbeat = self.comm.isend(held, dest=0, tag=int(Tag.HEARTBEAT))
            self._outbox.append(self._heartbeat)
            self._last_beat = now

    def _receive(self) -> tuple[Tag, Any]:
        backoff = _Backoff(WORKER_MAX_POLL)
        heard = time.monotonic()
        while True:
            message = next(drain(self.comm, 0, self._status), None)
            if message is not None:
                tag = Tag(self._status.Get_tag())
                payload = self._take(message)
                if tag is not Tag.PING:
                    return tag, payload
                heard = time.monotonic()
                backoff.reset()
                continue
            # before the settings arrive rank 0 may still be reading a large archive: no limit then
            if self.settings is not None and time.monotonic() - heard > MASTER_SILENCE_TIMEOUT:
                raise _MasterSilent
            self._reap()
            backoff.sleep()

    def _configure(self, settings: EvaluatorSettings, interval: float) -> None:
        from globopt.evaluator.evaluate import prepare_worker

        self.settings, self.interval = settings, interval
        # torch reads OMP_NUM_THREADS when it is imported; potentials that never import torch (EMT) skip
        # that import entirely instead of paying for it in prepare_worker(torch_threads=...).
        os.environ["OMP_NUM_THREADS"] = str(self.threads)
        try:
            prepare_worker(settings)
        except Exception as exc:
            self._report(exc)
            return
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(self.threads)
        try:
            from globopt.evaluator.batch_evaluate import BatchEvaluator, worker_limits

            limits = worker_limits(settings)
            if limits.batched:
                self.batch = BatchEvaluator(settings, limits, between=self._beat)
        except Exception as exc:
            self._report(exc)
            return
        self.stats.startup = time.perf_counter() - self.started
        ready = WorkerReady(self.stats.label, self.threads, self.stats.startup, limits.structures)
        self._send(Tag.READY, ready)

    def _evaluate(self, task: RelaxTask) -> None:
        from globopt.evaluator.evaluate import evaluate_task

        if self.settings is None:
            self._report(RuntimeError("MPI worker received a task before its settings"), task.candidate_id)
            return
        started = time.perf_counter()
        self._task_id = task.candidate_id
        self._last_beat = time.monotonic()
        try:
            evaluation = evaluate_task(task, self.settings, on_step=self._on_step)
        except Exception as exc:
            self._report(exc, task.candidate_id)
            return
        finally:
            self._task_id = None
            self.stats.busy += time.perf_counter() - started
        self.stats.tasks += 1
        self._send(Tag.RESULT, (task.candidate_id, task.attempt, evaluation))

    def _on_step(self, step: int, energy: float) -> None:
        """Called by relax() after every optimiser step: heartbeat, and honour a stop request."""
        now = time.monotonic()
        if now >= self._next_stop_check:
            self._next_stop_check = now + STOP_CHECK_INTERVAL
            stop = next(drain(self.comm, 0, self._status, tag=int(Tag.STOP)), None)
            if stop is not None:
                stop.recv()  # received, not just probed: MPI_Finalize fails on unreceived messages
                self._stopped = True
                raise _StopRequested
        if now - self._last_beat >= self.interval and (self._heartbeat is None or self._heartbeat.Test()):
            self._heartbeat = self.comm.isend(self._task_id, dest=0, tag=int(Tag.HEARTBEAT))
            self._outbox.append(self._heartbeat)
            self._last_beat = now

    def _report(self, exc: BaseException, candidate_id: int | None = None) -> None:
        text = "".join(traceback.format_exception(exc))
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # an exception type that cannot travel: send its text instead
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        self._send(Tag.ERROR, WorkerFailure(candidate_id, exc, text))

    def _take(self, message: Any) -> Any:
        """Receive a matched message without spinning.

        A large message needs rank 0 to drive progress too, and MPICH's blocking receive would burn this
        rank's core meanwhile, on a node where rank 0 may be waiting for that core.
        """
        request = message.irecv()
        backoff = _Backoff(WORKER_MAX_POLL)
        while True:
            done, payload = request.test()
            if done:
                return payload
            backoff.sleep()

    def _send(self, tag: Tag, payload: Any) -> None:
        self._outbox.append(self.comm.isend(payload, dest=0, tag=int(tag)))
        self._reap()

    def _reap(self) -> None:
        self._outbox = [request for request in self._outbox if not request.Test()]

    def _say_bye(self) -> None:
        """Send BYE with this rank's statistics, then wait (bounded) for rank 0's STOP and our sends.

        A rank leaving on its own (SIGTERM, SIGINT) must still take the STOP that rank 0 sends every
        worker, or MPI_Finalize would find it unreceived; whatever else arrives meanwhile is discarded.
        """
        self.stats.wall = time.perf_counter() - self.started
        self.stats.cpu = _cpu_seconds()
        try:
            self._send(Tag.BYE, self.stats)
            deadline = time.monotonic() + RELEASE_TIMEOUT
            backoff = _Backoff(WORKER_MAX_POLL)
            while (self._outbox or not self._stopped) and time.monotonic() < deadline:
                message = next(drain(self.comm, 0, self._status), None)
                if message is not None:
                    self._stopped = self._stopped or self._status.Get_tag() == Tag.STOP
                    self._take(message)
                    continue
                self._reap()
                backoff.sleep()
        except Exception as exc:  # rank 0 is gone; nothing left to tell it
            print(f"globopt: MPI worker {self.stats.label}: could not say goodbye: {exc}", file=sys.stderr)
