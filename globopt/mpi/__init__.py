"""MPI backend: ``mpiexec -n N globopt run|resume ...`` searches on rank 0 and relaxes on ranks 1..N-1.

Why it is built this way
------------------------
* Rank 0 (the master) runs the ordinary engine: search, archive, run directory, progress. It reaches the
  worker ranks only through :class:`WorkerPool`, wrapped by ``globopt.scheduler.MPIScheduler``, so the
  engine cannot tell MPI from the local pool. Steady state: a result frees its rank and the engine hands
  that rank the next candidate at once; there is no generation barrier. The pool's capacity is the number
  of live worker ranks; MPIScheduler keeps one more task queued per rank on top of it.
* Worker ranks receive ``EvaluatorSettings`` once, load the potential once (``prepare_worker``), then
  loop: task -> ``evaluate`` -> result, until rank 0 says stop. Every exit path of rank 0 (normal end,
  exception, exit code 2, Ctrl-C, SIGTERM) releases them, so a bad config never leaves workers hanging.
* Nobody busy-waits. MPICH's blocking receives spin at 100% CPU, which on a small node steals a core from
  a relaxing rank, so both sides poll with ``improbe`` and short, growing sleeps.

One module per job
------------------
* :mod:`~globopt.mpi.launch`: when MPI is used (the rule), torch threads per rank, the entry point every
  rank runs, the supervisor that keeps a dead worker from killing the job, and MPI_Finalize.
* :mod:`~globopt.mpi.protocol`: tags, timeouts, polling backoff, drain and the message types, which both
  sides share.
* :mod:`~globopt.mpi.master`: rank 0's endpoint for the whole process (send, receive, release the workers).
* :mod:`~globopt.mpi.pool`: :class:`WorkerPool`, rank 0's scheduler: task assignment, heartbeats, dead ranks.
* :mod:`~globopt.mpi.worker`: the loop of ranks 1..N-1.

None of them imports mpi4py at import time: ``globopt.cli`` imports this package in every run to ask
:func:`use_mpi`, and a run without mpiexec must not initialise MPI.
"""

from __future__ import annotations

from globopt.mpi.launch import (
    announced_rank,
    announced_size,
    launched_by_mpi,
    run_under_mpi,
    threads_per_rank,
    use_mpi,
)
from globopt.mpi.master import WorkersLost, master_active
from globopt.mpi.pool import WorkerPool
from globopt.mpi.protocol import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    HEARTBEAT_TIMEOUT_VARIABLE,
    MASTER_MAX_POLL,
    MASTER_SILENCE_TIMEOUT,
    MIN_POLL,
    PING_INTERVAL,
    RELEASE_TIMEOUT,
    STARTUP_TIMEOUT,
    STOP_CHECK_INTERVAL,
    WORKER_MAX_POLL,
    Tag,
    WorkerFailure,
    WorkerReady,
    WorkerStats,
    drain,
    heartbeat_timeout,
)

__all__ = [
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TIMEOUT",
    "HEARTBEAT_TIMEOUT_VARIABLE",
    "MASTER_MAX_POLL",
    "MASTER_SILENCE_TIMEOUT",
    "MIN_POLL",
    "PING_INTERVAL",
    "RELEASE_TIMEOUT",
    "STARTUP_TIMEOUT",
    "STOP_CHECK_INTERVAL",
    "WORKER_MAX_POLL",
    "Tag",
    "WorkerFailure",
    "WorkerPool",
    "WorkerReady",
    "WorkerStats",
    "WorkersLost",
    "announced_rank",
    "announced_size",
    "drain",
    "heartbeat_timeout",
    "launched_by_mpi",
    "master_active",
    "run_under_mpi",
    "threads_per_rank",
    "use_mpi",
]
