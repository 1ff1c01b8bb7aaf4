"""MPI backend: ``mpiexec -n N globopt run|resume ...`` searches on rank 0 and relaxes on ranks 1..N-1.

Why it is built this way
------------------------
* Rank 0 (the master) runs the ordinary engine: search, archive, run directory, progress. It reaches the
  worker ranks only through :class:`WorkerPool`, wrapped by ``globopt.scheduler.MPIScheduler``, so the
  engine cannot tell MPI from the local pool. Steady state: a result frees its rank and the engine hands
  that rank the next candidate at once; there is no generation barrier. capacity = live worker ranks.
* Worker ranks receive ``EvaluatorSettings`` once, load the potential once (``prepare_worker``), then
  loop: task -> ``evaluate`` -> result, until rank 0 says stop. Every exit path of rank 0 (normal end,
  exception, exit code 2, Ctrl-C, SIGTERM) releases them, so a bad config never leaves workers hanging.
* Nobody busy-waits. MPICH's blocking receives spin at 100% CPU, which on a small node steals a core from
  a relaxing rank, so both sides poll with ``improbe`` and short, growing sleeps.

When MPI is used (the rule; mpi4py is not even imported otherwise)
-----------------------------------------------------------------
``GLOBOPT_MPI=0`` never, ``GLOBOPT_MPI=1`` always. Otherwise globopt was launched by an MPI launcher when
one of ``PMI_SIZE``/``PMI_RANK`` (MPICH hydra, Intel MPI, Slurm PMI-2), ``OMPI_COMM_WORLD_SIZE``/
``OMPI_COMM_WORLD_RANK`` (Open MPI), ``MPI_LOCALNRANKS`` (MPICH hydra) or ``PMIX_RANK`` (PMIx launchers)
is set. The world size is read from ``PMI_SIZE`` or ``OMPI_COMM_WORLD_SIZE`` (mpi4py is asked when neither
is set); a world of one rank runs exactly as without mpiexec (``workers`` from the config applies).

Surviving a dead worker (SIGKILL, out of memory)
-----------------------------------------------
MPICH's hydra (checked with 5.0.2) SIGKILLs the whole job when a rank's process is killed by a signal,
even with ``-disable-auto-cleanup``; with that flag it only notifies the others (SIGUSR1) when a rank's
process *exits*. So each worker rank forks before MPI starts: the MPI process is the child, and the
process hydra watches is a small supervisor that waits for it and always exits normally. Users must run
``mpiexec -disable-auto-cleanup -n N globopt run ...``, or put the line ``-disable-auto-cleanup`` in a
hydra config file (``$HYDRA_CONFIG_FILE`` or ``~/.mpiexec.hydra.conf``; no plain variable exists);
without it a worker death still kills every rank, and the run is resumed like after any kill.
Rank 0 notices a dead rank by its silence: a busy worker sends a heartbeat at most every
:data:`HEARTBEAT_INTERVAL` seconds from inside the relaxation, and a busy rank silent for
:data:`HEARTBEAT_TIMEOUT` seconds (``GLOBOPT_MPI_HEARTBEAT_TIMEOUT``) is declared dead: its candidate
comes back from ``collect()`` as ``worker_died`` (the engine re-issues it) and it gets no more work. A
result that arrives later from such a rank is dropped: a result is accepted only for the task currently
assigned to the rank that sends it, so no candidate can be committed twice.
``MPIR_CVAR_NO_COLLECTIVE_FINALIZE=1`` is set because MPICH's collective ``MPI_Finalize`` hangs forever
once any rank has died; the stop/acknowledge handshake below replaces it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import resource
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from globopt.candidate import Evaluation, RelaxTask
    from globopt.evaluation import EvaluatorSettings

log = logging.getLogger("globopt")

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

_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_LAUNCHER_VARIABLES = (*_SIZE_VARIABLES, *_RANK_VARIABLES, "MPI_LOCALNRANKS")


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


class WorkersLost(RuntimeError):
    """Every worker rank is gone; the run cannot continue but nothing committed is lost."""


class _Terminated(BaseException):
    """SIGTERM outside the engine's own handler; a BaseException so relax() cannot swallow it."""


class _StopRequested(BaseException):
    """Rank 0 asked a busy worker to stop; a BaseException so relax() cannot record it as a failure."""


class _MasterSilent(Exception):
    """An idle worker heard nothing from rank 0 for MASTER_SILENCE_TIMEOUT."""


@dataclass
class WorkerReady:
    label: str  # hostname:pid, as in results.csv's worker column
    torch_threads: int
    seconds: float  # from MPI start to the potential loaded


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


# -- launch detection (no mpi4py import) -------------------------------------------------------------------
def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an MPI launcher started this process (see the module docstring for the rule)."""
    env = os.environ if environ is None else environ
    switch = env.get("GLOBOPT_MPI", "").strip()
    if switch in ("0", "1"):
        return switch == "1"
    return any(name in env for name in _LAUNCHER_VARIABLES)


def announced_size(environ: Mapping[str, str] | None = None) -> int | None:
    """World size the launcher put in the environment, or None when it did not say."""
    env = os.environ if environ is None else environ
    return _first_int(env, _SIZE_VARIABLES)


def announced_rank(environ: Mapping[str, str] | None = None) -> int | None:
    env = os.environ if environ is None else environ
    return _first_int(env, _RANK_VARIABLES)


def use_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """Run the MPI master/worker split? False for one rank: that run needs no MPI at all."""
    if not launched_by_mpi(environ):
        return False
    size = announced_size(environ)
    return size is None or size > 1


def _first_int(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def heartbeat_timeout() -> float:
    raw = os.environ.get(HEARTBEAT_TIMEOUT_VARIABLE, "").strip()
    try:
        value = float(raw) if raw else HEARTBEAT_TIMEOUT
    except ValueError:
        value = HEARTBEAT_TIMEOUT
    return value if value > 0 else HEARTBEAT_TIMEOUT


def threads_per_rank(cores: int, ranks_on_node: int, usable: int | None = None) -> int:
    """Torch threads for each relaxing rank: the node's cores shared among all its ranks, rank 0 included.

    Rank 0 relaxes nothing but keeps its share. It is awake often (polling every few ms, and screening
    candidates costs it 0.2-0.6 s of CPU per evaluation), and torch's OpenMP threads collapse when any
    one of them loses its core: measured on 2 cores with other work running, a 60-step M3GNet relaxation
    of 8 atoms took 19-30 s on 2 threads against 2.7 s on 1. Losing a few threads to rounding is cheap
    next to that. ``usable`` caps the result at the cores this process may run on (a launcher may bind).
    """
    threads = max(1, cores // max(1, ranks_on_node))
    return max(1, min(threads, usable)) if usable else threads


# -- entry point ----------------------------------------------------------------------------------------
_MASTER: _Master | None = None


def master_active() -> bool:
    """True on rank 0 of a multi-rank launch: make_scheduler must hand work to the worker ranks."""
    return _MASTER is not None


def run_under_mpi(entry: Callable[[], int]) -> int:
    """Run the CLI command on rank 0 and serve it from every other rank; returns this rank's exit code."""
    rank_hint = announced_rank()
    if rank_hint is not None and rank_hint > 0:
        _supervise_this_rank(rank_hint)
    mpi = _start_mpi()
    comm = mpi.COMM_WORLD
    if comm.Get_size() == 1:
        return entry()
    threads = _node_threads(mpi, comm)
    try:
        if comm.Get_rank() == 0:
            return _run_master(comm, entry)
        return _Worker(comm, threads).run()
    finally:
        _finalize(mpi, comm)


def _finalize(mpi: Any, comm: Any) -> None:
    """Receive whatever is still queued, then MPI_Finalize; explicitly, not from mpi4py's exit hook.

    MPICH's MPI_Finalize fails while an incoming message is unreceived; the rank then exits without
    telling hydra, and hydra kills the whole job. Hence STOP/BYE: nothing is sent after a rank's last
    expected message, and what a dead or late rank sent is drained here.
    """
    with contextlib.suppress(mpi.Exception):
        for message in drain(comm, mpi.ANY_SOURCE, mpi.Status()):
            message.recv()
    try:
        mpi.Finalize()
    except mpi.Exception as exc:
        print(f"globopt: MPI_Finalize failed on rank {comm.Get_rank()}: {exc}", file=sys.stderr)


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


def _supervise_this_rank(rank: int) -> None:
    """Fork: the child becomes the MPI rank, this process waits for it and always exits normally.

    hydra kills every rank when the process it launched dies from a signal, but tolerates a normal exit
    (with -disable-auto-cleanup). The supervisor closes its copy of the PMI socket so that hydra still
    sees the rank's connection drop the moment the child dies, and it ignores the signals hydra sends to
    the whole process group (the child handles them). It exits 0 after a signal death because rank 0 has
    handled the loss (mpiexec's exit code would otherwise hide rank 0's).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        return
    pmi_fd = os.environ.get("PMI_FD", "").strip()
    if pmi_fd.isdigit():
        with contextlib.suppress(OSError):
            os.close(int(pmi_fd))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        sys.stderr.write(
            f"globopt: MPI worker rank {rank} (pid {child}) was killed by signal {-code}; "
            "rank 0 re-issues its candidate\n"
        )
        sys.stderr.flush()
        os._exit(0)
    os._exit(code)


def _start_mpi() -> Any:
    """Import mpi4py (this initialises MPI) with the settings the protocol relies on."""
    # Without fault tolerance compiled in, MPICH's collective MPI_Finalize waits forever for a dead rank.
    os.environ.setdefault("MPIR_CVAR_NO_COLLECTIVE_FINALIZE", "1")
    # hydra tells every rank about a dead one with SIGUSR1; Python's default action would kill them.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    import mpi4py

    mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI; torch's threads never do
    from mpi4py import MPI

    MPI.COMM_WORLD.Set_errhandler(MPI.ERRORS_RETURN)  # a failed call raises here instead of aborting all
    return MPI


def _node_threads(mpi: Any, comm: Any) -> int:
    """Collective over the node: how many torch threads each relaxing rank on this node gets."""
    node = comm.Split_type(mpi.COMM_TYPE_SHARED)
    ranks_on_node = node.Get_size()
    node.Free()
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return threads_per_rank(os.cpu_count() or 1, ranks_on_node, usable)


def _run_master(comm: Any, entry: Callable[[], int]) -> int:
    global _MASTER
    from globopt.cli import EXIT_ERROR, EXIT_INTERRUPTED

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


# -- rank 0 ---------------------------------------------------------------------------------------------
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


@dataclass
class _Assignment:
    """A task on a rank, and when rank 0 last heard from that rank (or handed it the task).

    Silence is judged only right after every queued message has been received: while the engine
    screens candidates or commits, heartbeats queue up unread, and a rank must not be declared dead
    for rank 0's own absence.
    """

    task: RelaxTask
    heard: float = field(default_factory=time.monotonic)


@dataclass
class _PoolStats:
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=lambda: _cpu_seconds())
    waiting: float = 0.0  # inside collect(): rank 0 is free for the workers, or handling their messages
    protocol: float = 0.0  # sending tasks, receiving and handling messages: this module's cost on rank 0
    completed: int = 0


class WorkerPool:
    """Rank 0's scheduler logic: hand tasks to idle worker ranks, collect results, detect dead ranks."""

    def __init__(self, settings: EvaluatorSettings) -> None:
        if _MASTER is None or _MASTER.released:
            raise RuntimeError("the MPI worker ranks are not available (not rank 0, or already released)")
        self.master = _MASTER
        self.settings = settings
        self.timeout = heartbeat_timeout()
        self.interval = min(HEARTBEAT_INTERVAL, self.timeout / 4)
        self.assigned: dict[int, _Assignment] = {}
        self.ready: dict[int, WorkerReady] = {}
        self.idle: deque[int] = deque()
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

    @property
    def capacity(self) -> int:
        return len([r for r in self.master.workers if r not in self.master.gone])

    @property
    def in_flight(self) -> int:
        return len(self.assigned) + len(self.queued) + len(self.lost)

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
                self.assigned[rank] = _Assignment(task)
                return True
            self._declare_gone(rank, dead=True)
        return False

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
        self.stats.completed += sum(1 for _, e in finished if e.status != "worker_died")
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
                "MPI worker rank %d (%s) ready after %.1f s, %d torch thread(s)",
                rank, payload.label, payload.seconds, payload.torch_threads,
            )  # fmt: skip
        elif tag is Tag.RESULT:
            candidate_id, attempt, evaluation = payload
            expected = None if assignment is None else (assignment.task.candidate_id, assignment.task.attempt)
            if expected != (candidate_id, attempt):
                log.debug("rank %d: result for candidate %d is not its task; ignored", rank, candidate_id)
                return []
            del self.assigned[rank]
            self.idle.append(rank)
            return [(assignment.task, evaluation)]
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
                return [(assignment.task, _died(assignment.task, reason))]
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
            log.warning(
                "MPI worker rank %d (%s) silent for %.0f s while relaxing candidate %d: declared dead "
                "(killed, out of memory or hung); it gets no more work",
                rank, label, silent, assignment.task.candidate_id,
            )  # fmt: skip
            del self.assigned[rank]
            self._declare_gone(rank, dead=True)
            reason = f"MPI worker rank {rank} ({label}) died (killed, out of memory or hung)"
            lost.append((assignment.task, _died(assignment.task, reason)))
        return lost

    def _ping_idle(self) -> None:
        now = time.monotonic()
        for rank in self.idle:
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
            "busy outside collect, %.2f ms CPU, %.3f ms in the MPI layer; rank 0 used %.1f%% of one core",
            self.stats.completed, len(self.master.workers), wall, share("busy"), share("idle"),
            share("tail"), share("startup"), 1000 * (wall - self.stats.waiting) / done,
            1000 * cpu / done, 1000 * self.stats.protocol / done, 100 * cpu / max(wall, 1e-9),
        )  # fmt: skip


def _died(task: RelaxTask, reason: str) -> Evaluation:
    from globopt.candidate import Evaluation, Status

    return Evaluation(candidate_id=task.candidate_id, status=Status.WORKER_DIED, reason=reason)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- ranks 1..N-1 ---------------------------------------------------------------------------------------
class _Worker:
    """A worker rank: settings once, then tasks until STOP. Exits 0; failures are reported via rank 0."""

    def __init__(self, comm: Any, threads: int) -> None:
        from mpi4py import MPI

        from globopt.evaluation import worker_label

        self.MPI = MPI
        self.comm = comm
        self.threads = threads
        self.settings: EvaluatorSettings | None = None
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
                self._evaluate(payload)
            idle_since = time.perf_counter()

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
        from globopt.evaluation import prepare_worker

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
        self.stats.startup = time.perf_counter() - self.started
        ready = WorkerReady(self.stats.label, self.threads, self.stats.startup)
        self._send(Tag.READY, ready)

    def _evaluate(self, task: RelaxTask) -> None:
        from globopt.evaluation import evaluate

        if self.settings is None:
            self._report(RuntimeError("MPI worker received a task before its settings"), task.candidate_id)
            return
        started = time.perf_counter()
        self._task_id = task.candidate_id
        self._last_beat = time.monotonic()
        try:
            evaluation = evaluate(task, self.settings, on_step=self._on_step)
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
