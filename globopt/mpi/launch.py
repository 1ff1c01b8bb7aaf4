"""How a globopt process finds out it runs under MPI, and what every rank does from start to finalize.

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
(How rank 0 notices a dead rank and re-issues its candidate is in :mod:`globopt.mpi.pool`.)
``MPIR_CVAR_NO_COLLECTIVE_FINALIZE=1`` is set because MPICH's collective ``MPI_Finalize`` hangs forever
once any rank has died; the stop/acknowledge handshake (STOP/BYE, see :func:`_finalize`) replaces it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

from globopt.mpi.master import _run_master
from globopt.mpi.protocol import drain
from globopt.mpi.worker import _Worker

_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_LAUNCHER_VARIABLES = (*_SIZE_VARIABLES, *_RANK_VARIABLES, "MPI_LOCALNRANKS")


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
