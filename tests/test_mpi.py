"""The MPI backend: launch detection, the relax() step hook, and real ``mpiexec`` runs.

The mpiexec runs use EMT on Cu2Au2 (about a second per relaxation) so the whole file stays near two
minutes on two cores; one run uses the real M3GNet. Worker-death tests need MPICH's hydra, the only
launcher whose ``-disable-auto-cleanup`` flag globopt relies on (see globopt/mpi/launch.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    PATIENCE,
    Gate,
    assert_logged_once_across_a_kill,
    committed,
    emt_config,
    globopt_process,
    logged_ids,
    read_results,
    subprocess_environment,
    wait_for,
    write_config,
)

from globopt import mpi

# the venv's own launcher (the `mpich` wheel) first, then PATH
MPIEXEC = shutil.which(
    "mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
)
# Launcher variables of an enclosing job must not leak into the runs started here.
_LAUNCHER_ENV = {"GLOBOPT_MPI", "PMI_SIZE", "PMI_RANK", "PMI_FD", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in subprocess_environment().items() if k not in _LAUNCHER_ENV and k != "MPI_LOCALNRANKS"
    }
    return {**env, "OPENBLAS_NUM_THREADS": "1", **extra}


def _require_mpiexec(hydra: bool = False) -> str:
    if MPIEXEC is None:
        pytest.skip("mpiexec not found: install the `mpich` wheel (pip install 'globopt[mpi]') or an MPI")
    if hydra:
        version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
        if "HYDRA" not in version:
            pytest.skip("worker-death tolerance is implemented for MPICH's hydra (-disable-auto-cleanup)")
    return MPIEXEC


def _mpi_globopt(
    ranks: int, *args: str, cwd: Path, flags: tuple[str, ...] = (), **env: str
) -> subprocess.Popen:
    command = [_require_mpiexec(), *flags, "-n", str(ranks), sys.executable, "-m", "globopt", *args]
    return subprocess.Popen(
        command, cwd=cwd, env=_clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen, timeout: float) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process.pid)
        output, _ = process.communicate()
        raise AssertionError(f"mpiexec did not finish within {timeout:.0f} s:\n{output}") from None
    return output


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for process in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _rank0_pid(run_dir: Path) -> int:
    return int(re.search(r"pid (\d+)", (run_dir / "run.lock").read_text()).group(1))


def _evaluated(run_dir: Path) -> list[dict[str, str]]:
    return [r for r in read_results(run_dir) if r["status"] not in ("rejected", "duplicate")]


# -- no mpiexec needed ------------------------------------------------------------------------------------
def test_launch_detection_rule() -> None:
    assert not mpi.launched_by_mpi({}) and not mpi.use_mpi({})
    assert mpi.use_mpi({"PMI_RANK": "0", "PMI_SIZE": "3", "MPI_LOCALNRANKS": "3"})
    assert mpi.use_mpi({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"})
    assert mpi.announced_rank({"OMPI_COMM_WORLD_RANK": "1"}) == 1
    assert not mpi.use_mpi({"PMI_RANK": "0", "PMI_SIZE": "1"}), "one rank runs exactly as without mpiexec"
    assert mpi.use_mpi({"PMIX_RANK": "0"}) and mpi.announced_size({"PMIX_RANK": "0"}) is None
    assert not mpi.use_mpi({"PMI_SIZE": "3", "GLOBOPT_MPI": "0"})
    assert mpi.use_mpi({"GLOBOPT_MPI": "1"})


def test_threads_share_the_node_among_its_ranks() -> None:
    assert mpi.threads_per_rank(cores=16, ranks_on_node=4) == 4
    assert mpi.threads_per_rank(cores=16, ranks_on_node=5) == 3
    assert mpi.threads_per_rank(cores=2, ranks_on_node=3) == 1
    assert mpi.threads_per_rank(cores=2, ranks_on_node=8) == 1
    assert mpi.threads_per_rank(cores=16, ranks_on_node=2, usable=1) == 1  # a launcher bound the rank


def test_plain_runs_never_import_mpi4py(tmp_path: Path) -> None:
    config = emt_config(tmp_path)
    code = (
        "import sys; from globopt.cli import main; rc = main(['validate', sys.argv[1]]);"
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported without mpiexec'; sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(config)],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_relax_reports_every_step_and_can_be_cancelled() -> None:
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from globopt.evaluator.relax import RelaxSettings, relax

    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.rattle(0.05, seed=1)
    steps: list[tuple[int, float]] = []
    outcome = relax(atoms, EMT(), RelaxSettings(fmax=0.01), on_step=lambda s, e: steps.append((s, e)))
    assert outcome.converged and len(steps) == len(outcome.energies)
    assert [s for s, _ in steps] == sorted(s for s, _ in steps) and steps[-1][1] == outcome.energies[-1]

    class Cancel(BaseException):
        pass

    def cancel(step: int, energy: float) -> None:
        if step == 2:
            raise Cancel

    with pytest.raises(Cancel):  # a BaseException is not recorded as a failed relaxation
        relax(atoms, EMT(), RelaxSettings(fmax=0.01), on_step=cancel)


class _FakeMaster:
    """Stands in for rank 0's MPI endpoint so WorkerPool's bookkeeping can be tested without mpiexec."""

    def __init__(self, size: int) -> None:
        self.workers = list(range(1, size))
        self.gone: set[int] = set()
        self.dead: set[int] = set()
        self.configured: set[int] = set()
        self.stop_sent: set[int] = set()
        self.last_sent: dict[int, float] = {}
        self.stats: dict = {}
        self.released = False
        self.sent: list[tuple[int, mpi.Tag, object]] = []
        self.inbox: list[tuple[int, mpi.Tag, object]] = []

    def send(self, rank: int, tag: mpi.Tag, payload: object = None) -> bool:
        self.sent.append((rank, tag, payload))
        return True

    def receive_all(self) -> list[tuple[int, mpi.Tag, object]]:
        received, self.inbox = self.inbox, []
        return received

    def stop(self, rank: int) -> bool:
        self.stop_sent.add(rank)
        return True

    def release(self) -> None:
        self.released = True


def test_pool_hands_back_dead_ranks_tasks_and_never_accepts_a_stale_result(monkeypatch) -> None:
    from globopt.candidate import Evaluation, RelaxTask, Status

    monkeypatch.setenv(mpi.HEARTBEAT_TIMEOUT_VARIABLE, "0.2")
    master = _FakeMaster(size=3)
    monkeypatch.setattr("globopt.mpi.master._MASTER", master)  # the module WorkerPool reads it from
    pool = mpi.WorkerPool(settings=None)
    assert [(r, t) for r, t, _ in master.sent] == [(1, mpi.Tag.SETTINGS), (2, mpi.Tag.SETTINGS)]
    first, second = RelaxTask(1, None), RelaxTask(2, None)
    submitted = time.monotonic()
    pool.submit(first)
    pool.submit(second)
    assert pool.in_flight == 2 and pool.capacity == 2

    done = Evaluation(2, Status.RELAXED)
    for rank in (1, 2):  # before READY a rank is loading its potential and may be silent for long
        master.inbox.append((rank, mpi.Tag.READY, mpi.WorkerReady(f"host:{rank}", 1, 0.1)))
    master.inbox.append((2, mpi.Tag.RESULT, (2, 1, done)))
    assert pool.collect() == [(second, done)]

    [(task, died)] = pool.collect()  # rank 1 stays silent: declared dead
    assert task is first and died.status is Status.WORKER_DIED and "rank 1" in died.reason
    assert time.monotonic() - submitted >= 0.2 and pool.capacity == 1 and 1 in master.dead

    retry = RelaxTask(1, None, attempt=2)
    pool.submit(retry)  # only rank 2 is left
    accepted = Evaluation(1, Status.RELAXED)
    master.inbox += [
        (1, mpi.Tag.RESULT, (1, 1, Evaluation(1, Status.RELAXED))),  # late, from the dead rank
        (2, mpi.Tag.RESULT, (1, 1, Evaluation(1, Status.RELAXED))),  # not the attempt rank 2 holds
        (2, mpi.Tag.HEARTBEAT, 1),
        (2, mpi.Tag.RESULT, (1, 2, accepted)),
    ]
    assert pool.collect() == [(retry, accepted)]

    third = RelaxTask(3, None)
    pool.submit(third)
    master.inbox.append((2, mpi.Tag.BYE, mpi.WorkerStats(label="host:1", reason="terminated (SIGTERM)")))
    with pytest.raises(mpi.WorkersLost):  # the last worker left; its task stays pending for a resume
        pool.collect()
    assert master.stop_sent == {2}, "a rank that says BYE gets its STOP at once"


def test_queued_task_starts_on_the_rank_that_finishes_before_rank_0_sees_the_result(monkeypatch) -> None:
    from globopt.candidate import Evaluation, RelaxTask, Status

    master = _FakeMaster(size=2)
    monkeypatch.setattr("globopt.mpi.master._MASTER", master)
    pool = mpi.WorkerPool(settings=None)
    first, queued = RelaxTask(1, None), RelaxTask(2, None)
    pool.submit(first)
    pool.submit(queued)  # the only rank is busy: the task waits on rank 0
    assert pool.in_flight == 2 and [t for _, t, _ in master.sent].count(mpi.Tag.TASK) == 1

    done = Evaluation(1, Status.RELAXED)
    master.inbox.append((1, mpi.Tag.RESULT, (1, 1, done)))
    assert pool.collect() == [(first, done)]
    # by the time the engine sees the result, rank 1 already holds the queued task
    assert master.sent[-1] == (1, mpi.Tag.TASK, queued) and pool.in_flight == 1

    # a rank that leaves while a task is queued: the queued task is kept for a resume, not lost silently
    pool.submit(RelaxTask(3, None))
    master.inbox.append((1, mpi.Tag.BYE, mpi.WorkerStats(label="host:1", reason="terminated (SIGTERM)")))
    with pytest.raises(mpi.WorkersLost):
        pool.collect()


def test_pool_raises_a_workers_exception_on_rank_0(monkeypatch) -> None:
    from globopt.candidate import RelaxTask

    master = _FakeMaster(size=2)
    monkeypatch.setattr("globopt.mpi.master._MASTER", master)
    pool = mpi.WorkerPool(settings=None)
    pool.submit(RelaxTask(1, None))
    failure = mpi.WorkerFailure(1, RuntimeError("cannot build the potential: boom"), "Traceback ...")
    master.inbox.append((1, mpi.Tag.ERROR, failure))
    with pytest.raises(RuntimeError, match="cannot build the potential") as caught:
        pool.collect()
    assert "raised on MPI worker rank 1" in "".join(caught.value.__notes__)


# -- real mpiexec runs ------------------------------------------------------------------------------------
@pytest.mark.mpi
def test_three_ranks_run_to_the_end_with_both_workers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = _mpi_globopt(
        3, "run", str(emt_config(tmp_path, evaluations=6)), "--out", str(out), cwd=tmp_path
    )
    output = _finish(process, timeout=PATIENCE)
    assert process.returncode == 0, output
    assert len(committed(out)) == 6
    workers = {r["worker"] for r in _evaluated(out)}
    assert len(workers) == 2, f"both worker ranks should relax: {workers}"
    assert f"{os.uname().nodename}:{_rank0_pid(out)}" not in workers, "rank 0 must not relax"
    assert "MPI: 2 worker rank(s)" in output
    assert sorted(logged_ids(out)) == sorted(committed(out))


@pytest.mark.mpi
def test_bad_config_exits_2_and_releases_the_workers(tmp_path: Path) -> None:
    """Rank 0 refuses the config before any work; the worker ranks are released, so the job ends (a job
    whose workers were left waiting would hang until the safety timeout)."""
    bad = write_config(tmp_path, name="bad", composition="Cu2Xx2", potential={"kind": "emt"}, bogus=1)
    process = _mpi_globopt(3, "run", str(bad), "--out", str(tmp_path / "run"), cwd=tmp_path)
    output = _finish(process, timeout=PATIENCE)
    assert process.returncode == 2, output
    assert "unknown key 'bogus'" in output and "not a chemical element symbol" in output
    assert not (tmp_path / "run").exists(), "a refused config leaves no run directory"


@pytest.mark.mpi
def test_a_killed_worker_rank_is_survived(tmp_path: Path) -> None:
    """A worker rank SIGKILLed inside a relaxation (held there by the gate): declared dead after the
    heartbeat timeout, its candidate re-issued, the surviving rank completes the budget."""
    import psutil

    _require_mpiexec(hydra=True)
    out = tmp_path / "run"
    config = emt_config(tmp_path, evaluations=8, gated=True)
    gate = Gate(tmp_path / "gate", out)
    gate.arm(1)
    process = _mpi_globopt(
        3, "run", str(config), "--out", str(out), cwd=tmp_path, flags=("-disable-auto-cleanup",),
        GLOBOPT_MPI_HEARTBEAT_TIMEOUT="5", **gate.env,
    )  # fmt: skip
    try:
        victim = psutil.Process(gate.wait(process)["pid"])
        assert victim in psutil.Process(process.pid).children(recursive=True)
        label = f"{socket.gethostname()}:{victim.pid}"
        victim.kill()
        gate.release()
        output = _finish(process, timeout=PATIENCE)
    finally:
        _kill_tree(process.pid)
    assert process.returncode == 0, output
    assert re.search(rf"MPI worker rank \d \({label}\) silent for .* declared dead", output), output
    assert len(committed(out)) == 8
    survivor = {r["worker"] for r in _evaluated(out)} - {label}
    assert len(survivor) == 1


@pytest.mark.mpi
def test_sigkilled_rank0_resumes_serially_and_under_mpi(tmp_path: Path) -> None:
    import psutil

    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", out)
    gate.arm(2)  # a worker rank holds its third candidate: the run cannot end before the kill
    process = _mpi_globopt(
        3, "run", str(emt_config(tmp_path, evaluations=6, gated=True)), "--out", str(out), cwd=tmp_path,
        **gate.env,
    )  # fmt: skip
    try:
        gate.wait(process)
        psutil.Process(_rank0_pid(out)).kill()  # hydra then kills every rank
        output = _finish(process, timeout=PATIENCE)
    finally:
        _kill_tree(process.pid)
    assert process.returncode != 0, output
    before = committed(out)
    assert 2 <= len(before) < 6

    serial = globopt_process("resume", str(out), cwd=tmp_path, env={"OPENBLAS_NUM_THREADS": "1"})
    output, _ = serial.communicate(timeout=PATIENCE)
    assert serial.returncode == 0, output
    middle = committed(out)
    assert len(middle) == 6 and {k: middle[k] for k in before} == before

    bigger = emt_config(tmp_path, evaluations=8, gated=True)
    process = _mpi_globopt(2, "run", str(bigger), "--out", str(out), "--resume", cwd=tmp_path)
    output = _finish(process, timeout=PATIENCE)
    assert process.returncode == 0, output
    after = committed(out)
    assert len(after) == 8 and {k: after[k] for k in middle} == middle
    assert_logged_once_across_a_kill(out, before, after)


@pytest.mark.mpi
def test_a_ga_whose_workers_build_its_children_resumes_after_rank_0_is_killed(tmp_path: Path) -> None:
    """Under MPI the GA's next children are planned ahead and built by the workers; the plans are search
    state. Rank 0 killed while breeding: the resumed run loses and repeats nothing."""
    import json
    import sqlite3

    import psutil

    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", out)
    gate.arm(7)  # a worker holds its eighth candidate, after breeding has started (population 4)
    config = emt_config(tmp_path, evaluations=14, gated=True, mode="ga", ga={"population_size": 4})
    process = _mpi_globopt(3, "run", str(config), "--out", str(out), cwd=tmp_path, **gate.env)
    try:
        gate.wait(process)
        psutil.Process(_rank0_pid(out)).kill()
        output = _finish(process, timeout=PATIENCE)
    finally:
        _kill_tree(process.pid)
    assert process.returncode != 0, output
    before = committed(out)
    db = sqlite3.connect(out / "archive.sqlite")
    state = json.loads(db.execute("SELECT value FROM search_state WHERE key='state'").fetchone()[0])
    db.close()
    assert state["children"]["planned"], "children were planned ahead for the workers when rank 0 died"

    process = _mpi_globopt(3, "resume", str(out), cwd=tmp_path)
    output = _finish(process, timeout=PATIENCE)
    assert process.returncode == 0, output
    after = committed(out)
    assert len(after) == 14 and {k: after[k] for k in before} == before
    assert_logged_once_across_a_kill(out, before, after)
    db = sqlite3.connect(out / "archive.sqlite")
    bred = db.execute("SELECT COUNT(*) FROM candidates WHERE parents != '[]'").fetchone()[0]
    db.close()
    assert bred >= 4, "the GA bred children after its first generation"


@pytest.mark.mpi
@pytest.mark.m3gnet
def test_m3gnet_on_three_ranks(tmp_path: Path, models_dir: Path) -> None:
    config = write_config(
        tmp_path, name="nacl", composition="Na4Cl4", seed=5, budget={"evaluations": 4},
        potential={"model": "M3GNet-MP-2021.2.8-PES"},
    )  # fmt: skip
    out = tmp_path / "run"
    process = _mpi_globopt(
        3, "run", str(config), "--out", str(out), cwd=tmp_path, GLOBOPT_MODELS=str(models_dir)
    )
    output = _finish(process, timeout=PATIENCE)
    assert process.returncode == 0, output
    rows = _evaluated(out)
    assert len(rows) == 4 and len({r["worker"] for r in rows}) == 2
    assert all(float(r["energy_per_atom"]) < -2.5 for r in rows if r["status"] == "relaxed")


@pytest.mark.mpi
def test_a_worker_rank_killed_in_the_middle_of_a_batch_hands_back_its_whole_batch(tmp_path: Path) -> None:
    """Batching ranks (BatchedEMT, 3 candidates each): the calculator marks a chosen batched call on disk,
    the test kills that rank then; every candidate it held is re-issued, nothing is committed twice."""
    import psutil

    _require_mpiexec(hydra=True)
    out, marker = tmp_path / "run", tmp_path / "marker"
    config = write_config(
        tmp_path, name="batch", composition="Cu2Au2", seed=11, budget={"evaluations": 12},
        potential={"kind": "ase", "calculator": "batch_calculators:MarkingBatchedEMT"},
        relax={"batch_size": 3, "max_steps": 150},
    )  # fmt: skip
    tests_dir = str(Path(__file__).parent)
    process = _mpi_globopt(
        3, "run", str(config), "--out", str(out), cwd=tmp_path, flags=("-disable-auto-cleanup",),
        GLOBOPT_MPI_HEARTBEAT_TIMEOUT="5", GLOBOPT_TEST_MARKER=str(marker), GLOBOPT_TEST_MARK_AT="4",
        PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
    )  # fmt: skip
    try:
        wait_for(marker.exists, 120, "the marked batched call")
        victim = psutil.Process(int(marker.read_text()))
        victim.kill()
        output = _finish(process, timeout=240)
    finally:
        _kill_tree(process.pid)
    assert process.returncode == 0, output
    assert re.search(r"silent for .* while relaxing candidate\(s\) \d+, \d+", output), output
    rows = committed(out)
    assert len(rows) == 12
    logged = logged_ids(out)
    assert len(logged) == len(set(logged)) == 12
    assert {r["worker"] for r in _evaluated(out)} - {f"{os.uname().nodename}:{victim.pid}"}
