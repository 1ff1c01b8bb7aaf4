"""Rank 0's endpoint to the worker ranks for the whole process, and rank 0's entry point.

One :class:`_Master` lives as long as the process, not as long as an engine (``globopt benchmark`` runs
one search after another, each with its own :class:`~globopt.mpi.pool.WorkerPool`): it remembers which
ranks are configured, gone or stopped, and :func:`_run_master` releases the workers through it on every
exit path of rank 0. WorkerPool reads :data:`_MASTER` from this module when it is built, so this is the
one place to replace it (tests do).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from globopt.mpi.protocol import (
    MASTER_MAX_POLL,
    RELEASE_TIMEOUT,
    Tag,
    WorkerStats,
    _Backoff,
    _raise_terminated,
    _Terminated,
    drain,
)

log = logging.getLogger("globopt")


class WorkersLost(RuntimeError):
    """Every worker rank is gone; the run cannot continue but nothing committed is lost."""


_MASTER: _Master | None = None


def master_active() -> bool:
    """True on rank 0 of a multi-rank launch: make_scheduler must hand work to the worker ranks."""
    return _MASTER is not None


def _run_master(comm: Any, entry: Callable[[], int]) -> int:
    global _MASTER
    from globopt.exit_codes import EXIT_ERROR, EXIT_INTERRUPTED

    # The master never relaxes: one thread for anything torch it may load (OMP is read at torch import).
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    master = _MASTER = _Master(comm)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return entry()
    except (KeyboardInterrupt, _Terminated):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except WorkersLost as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)
        master.release()


class _Master:
    """Rank 0's side of the world for the whole process: sending, receiving, and releasing the workers."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm
        self.workers = list(range(1, comm.Get_size()))
        self.gone: set[int] = set()  # declared dead, or said BYE: never sent work again
        self.dead: set[int] = set()  # declared dead (no BYE expected)
        self.configured: set[int] = set()
        self.stop_sent: set[int] = set()
        self.last_sent: dict[int, float] = {}
        self.released = False
        self.stats: dict[int, WorkerStats] = {}
        self._outbox: list[Any] = []  # requests in flight; their pickled buffers must stay alive
        self._status = MPI.Status()

    def send(self, rank: int, tag: Tag, payload: Any = None) -> bool:
        """Non-blocking send; False when MPI refuses (the rank is gone)."""
        try:
            request = self.comm.isend(payload, dest=rank, tag=int(tag))
        except self.MPI.Exception as exc:
            log.debug("MPI send to rank %d failed: %s", rank, exc)
            return False
        self._outbox.append(request)
        self.last_sent[rank] = time.monotonic()
        if len(self._outbox) > 64:
            self._outbox = [r for r in self._outbox if not r.Test()]
        return True

    def receive_all(self) -> list[tuple[int, Tag, Any]]:
        """Every message that has arrived from the workers, oldest first (see drain())."""
        received = []
        for message in drain(self.comm, self.MPI.ANY_SOURCE, self._status):
            received.append((self._status.Get_source(), Tag(self._status.Get_tag()), message.recv()))
        return received

    def release(self) -> None:
        """Tell every worker to stop and wait (bounded) for their acknowledgements. Idempotent."""
        if self.released:
            return
        self.released = True
        waiting = set()
        for rank in self.workers:
            # a rank declared dead may merely hang, so it is told too, but not waited for
            if self.stop(rank) and rank not in self.gone:
                waiting.add(rank)
        deadline = time.monotonic() + RELEASE_TIMEOUT
        backoff = _Backoff(MASTER_MAX_POLL)
        while waiting and time.monotonic() < deadline:
            received = self.receive_all()
            for rank, tag, payload in received:
                if tag is Tag.BYE:
                    waiting.discard(rank)
                    self.gone.add(rank)
                    if isinstance(payload, WorkerStats):
                        self.stats[rank] = payload
            if not received:
                backoff.sleep()
        if waiting:
            log.warning(
                "MPI worker rank(s) %s did not acknowledge the stop within %.0f s; exiting without them",
                ", ".join(map(str, sorted(waiting))),
                RELEASE_TIMEOUT,
            )
        self._outbox = [r for r in self._outbox if not r.Test()]

    def stop(self, rank: int) -> bool:
        """Send STOP once per rank: every worker waits for exactly one before it leaves (see _finalize)."""
        if rank in self.stop_sent:
            return True
        self.stop_sent.add(rank)
        return self.send(rank, Tag.STOP)
