"""What rank 0 and the worker ranks agree on: message tags, timeouts, polling, drain, message types.

Both sides import this module and nothing of each other, so the rules of the conversation live in one
place: what each tag carries, how long silence is tolerated, and how to poll without busy-waiting
(:func:`drain` and :class:`_Backoff`; see the package docstring). What both sides need to leave on
SIGTERM and to measure their CPU time is here for the same reason.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

# A busy worker rank silent for this long (seconds) is declared dead. Generous by default because one
# optimiser step of a large cell can take seconds and a node can be overloaded; tests lower it.
HEARTBEAT_TIMEOUT = 120.0
HEARTBEAT_TIMEOUT_VARIABLE = "GLOBOPT_MPI_HEARTBEAT_TIMEOUT"
# At most one heartbeat per interval: cheap (a few bytes, non-blocking) yet far below any sane timeout.
HEARTBEAT_INTERVAL = 2.0
# Until a worker reports that its potential is loaded, silence is normal (model loading blocks).
STARTUP_TIMEOUT = 600.0
# How often a busy worker looks for a stop request from rank 0 inside the relaxation.
STOP_CHECK_INTERVAL = 0.2
# Idle workers hear from rank 0 at least this often, so a worker on another node whose master died can
# give up after MASTER_SILENCE_TIMEOUT instead of waiting for the job's wall-time limit.
PING_INTERVAL = 30.0
MASTER_SILENCE_TIMEOUT = 600.0
# How long rank 0 waits for the workers to acknowledge "stop" before it exits anyway.
RELEASE_TIMEOUT = 30.0
# Polling: sleeps grow from MIN to MAX while nothing arrives. The master's latency matters less than its
# CPU use (it shares the node with relaxing ranks); an idle worker's latency is idle time, so it polls
# a little faster.
MIN_POLL = 0.0002
MASTER_MAX_POLL = 0.01
WORKER_MAX_POLL = 0.005


class Tag(IntEnum):
    """Message kinds; rank 0 sends the first four, worker ranks the rest."""

    SETTINGS = 1  # (EvaluatorSettings, heartbeat interval): once, before any task
    TASK = 2  # RelaxTask
    STOP = 3  # finish: abandon the current task, acknowledge with BYE, exit
    PING = 4  # rank 0 is alive (sent to idle workers only)
    READY = 11  # WorkerReady: the potential is loaded
    HEARTBEAT = 12  # candidate id: still relaxing
    RESULT = 13  # (candidate id, attempt, Evaluation)
    ERROR = 14  # WorkerFailure: an exception rank 0 must raise (e.g. the potential cannot be built)
    BYE = 15  # WorkerStats: this rank has stopped and will not send anything else


class _Terminated(BaseException):
    """SIGTERM outside the engine's own handler; a BaseException so relax() cannot swallow it."""


@dataclass
class WorkerReady:
    label: str  # hostname:pid, as in results.csv's worker column
    torch_threads: int
    seconds: float  # from MPI start to the potential loaded
    slots: int = 1  # candidates it relaxes at once (relax.batch_size as the worker resolved it)


@dataclass
class WorkerFailure:
    candidate_id: int | None
    exception: BaseException
    traceback: str


@dataclass
class WorkerStats:
    """What a worker did, sent with BYE so rank 0 can report where worker time went."""

    label: str = ""
    reason: str = "stopped"
    tasks: int = 0
    torch_threads: int = 0
    wall: float = 0.0
    startup: float = 0.0  # until the potential was loaded
    busy: float = 0.0  # inside evaluate()
    idle: float = 0.0  # between sending a result and receiving the next task
    tail: float = 0.0  # after the last result until stop (waiting for the run to end)
    cpu: float = 0.0


def heartbeat_timeout() -> float:
    raw = os.environ.get(HEARTBEAT_TIMEOUT_VARIABLE, "").strip()
    try:
        value = float(raw) if raw else HEARTBEAT_TIMEOUT
    except ValueError:
        value = HEARTBEAT_TIMEOUT
    return value if value > 0 else HEARTBEAT_TIMEOUT


def drain(comm: Any, source: int, status: Any, tag: int | None = None) -> Iterator[Any]:
    """Yield a matched message (``mpi4py.MPI.Message``) for everything that has arrived from ``source``.

    The caller must receive each message before asking for the next. One miss does not mean empty:
    MPICH's improbe looks before it drives progress, so after a quiet spell it returns None while more
    messages wait (measured: one message per pass). Two misses in a row do mean empty.
    """
    from mpi4py import MPI

    misses = 0
    while misses < 2:
        message = comm.improbe(source=source, tag=MPI.ANY_TAG if tag is None else tag, status=status)
        if message is None:
            misses += 1
            continue
        misses = 0
        yield message


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(f"signal {signum}")


class _Backoff:
    """Sleep a little longer each time nothing happened; start short again after something did."""

    def __init__(self, maximum: float) -> None:
        self.maximum = maximum
        self.delay = MIN_POLL
        self.slept = 0.0

    def reset(self) -> None:
        self.delay = MIN_POLL

    def sleep(self) -> None:
        started = time.perf_counter()
        time.sleep(self.delay)
        self.slept += time.perf_counter() - started  # measured: a loaded node oversleeps
        self.delay = min(self.delay * 2, self.maximum)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
