"""The fault catalogue of docs/reliability.md, beyond kills and disk faults: what else happens to runs.

Each test is one case of the catalogue's "More faults" table: a clock stepped back, lock files left by dead
or remote processes, file systems without locks, a whole worker pool killed, signals to a pool run, `status`
while commits land, a lost WAL file, a foreign archive, a moved run directory, runs read on a machine
without their model, races for one new directory, odd paths, a damaged search state, an archive locked by
another program, inputs gone before a resume, and the report written on a full disk. Real processes and EMT
throughout; the gate (tests/gate_calculator.py) stops runs where a case needs them stopped.
"""

from __future__ import annotations

import errno
import json
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import (
    PATIENCE,
    Gate,
    committed,
    emt_config,
    globopt_process,
    logged_ids,
    read_results,
    sigkill_at_gate,
    subprocess_environment,
    write_config,
)

from globopt.cli import main


def globopt(*args: str, cwd: Path, env: dict | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "globopt", *args], cwd=cwd, capture_output=True, text=True, timeout=PATIENCE,
        env=subprocess_environment(env), preexec_fn=preexec_fn,
    )  # fmt: skip


def file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def killed_run(tmp_path: Path, after: int = 2, evaluations: int = 4, **extra) -> tuple[Path, Path, dict]:
    """A gated run SIGKILLed inside the relaxation after ``after`` commits: (config, run dir, committed)."""
    config = emt_config(tmp_path, evaluations=evaluations, gated=True, **extra)
    out = tmp_path / "run"
    before = sigkill_at_gate(
        "run",
        str(config),
        "--out",
        str(out),
        out=out,
        cwd=tmp_path,
        count=after,
        gate=Gate(tmp_path / "gate", out),
    )
    return config, out, before


# -- disk -------------------------------------------------------------------------------------------------
def test_full_disk_while_a_new_run_is_created_leaves_nothing_half_made(tmp_path: Path) -> None:
    config = emt_config(tmp_path, evaluations=2)
    out = tmp_path / "run"
    full = globopt("run", str(config), "--out", str(out), cwd=tmp_path, preexec_fn=file_size_limit(2048))
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr and "the disk may be full" in full.stderr
    assert not (out / "archive.sqlite").exists(), "no half-made archive is left behind"
    retry = globopt("run", str(config), "--out", str(out), cwd=tmp_path)
    assert retry.returncode == 0, retry.stderr
    assert len(committed(out)) == 2


def test_report_on_a_full_disk_keeps_the_previous_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=3)), "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    before = snapshot(out / "report")
    full = globopt("report", str(out), cwd=tmp_path, preexec_fn=file_size_limit(4096))
    assert full.returncode == 2, full.stderr
    assert f"cannot write the report into {out / 'report'}" in full.stderr and "Traceback" not in full.stderr
    after = {k: v for k, v in snapshot(out / "report").items() if ".tmp" not in k}
    assert after == before, "a report that fails half-way leaves the previous one whole"


# -- clocks -----------------------------------------------------------------------------------------------
def test_a_clock_stepped_back_mid_run_does_not_reorder_commits(tmp_path: Path, monkeypatch) -> None:
    """The surrogate is rebuilt in commit order, read from the commit stamps: they must stay in order."""
    import globopt.archive as archive_module

    real_time = archive_module.time.time
    calls = {"n": 0}

    def stepped_back() -> float:
        calls["n"] += 1
        return real_time() - (3600.0 if calls["n"] > 4 else 0.0)  # NTP steps the clock back an hour

    monkeypatch.setattr(archive_module.time, "time", stepped_back)
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=6)), "--out", str(out)]) == 0
    db = sqlite3.connect(out / "archive.sqlite")
    stamped = [
        r[0]
        for r in db.execute("SELECT id FROM candidates WHERE finished_at IS NOT NULL ORDER BY finished_at")
    ]
    db.close()
    assert calls["n"] > 4, "the clock was stepped back during the run"
    relaxed_in_log_order = logged_ids(out)
    assert [i for i in stamped if i in set(relaxed_in_log_order)] == relaxed_in_log_order
    from globopt.archive import Archive

    archive = Archive(out / "archive.sqlite", read_only=True)
    try:
        order = [r.id for r in archive.relaxed_in_commit_order()]
    finally:
        archive.close()
    assert order == [i for i in relaxed_in_log_order if i in set(order)]


# -- locks ------------------------------------------------------------------------------------------------
def test_a_stale_lock_file_from_a_dead_process_on_another_host_is_no_obstacle(tmp_path: Path, capsys) -> None:
    _, out, before = killed_run(tmp_path)
    (out / "run.lock").write_text("pid 4242 on node17.cluster\n")  # what NFS leaves after a node died
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "state: not running" in capsys.readouterr().out
    assert main(["resume", str(out)]) == 0
    after = committed(out)
    assert len(after) == 4 and {k: after[k] for k in before} == before


def test_a_file_system_without_locks_is_named(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(out)]) == 0
    import globopt.rundir as rundir

    def no_locks(handle, operation) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    before = snapshot(out)
    assert main(["resume", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"cannot lock {out / 'run.lock'}" in error and "does not support file locks" in error
    assert main(["status", str(out)]) == 0
    assert "state: cannot tell whether a process writes the run" in capsys.readouterr().out
    assert snapshot(out) == before


def test_two_runs_racing_for_one_new_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", out)
    gate.arm(0)
    first = globopt_process(
        "run",
        str(emt_config(tmp_path, evaluations=2, gated=True)),
        "--out",
        str(out),
        cwd=tmp_path,
        env=gate.env,
    )
    try:
        gate.wait(first)
        second = globopt(
            "run", str(emt_config(tmp_path, name="other", evaluations=2)), "--out", str(out), cwd=tmp_path
        )
        assert second.returncode == 2, second.stderr
        assert f"is being written by pid {first.pid}" in second.stderr
        gate.release()
        output, _ = first.communicate(timeout=PATIENCE)
    finally:
        first.kill()
    assert first.returncode == 0, output
    assert len(committed(out)) == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["name"] == "cuau"


def test_a_creation_killed_half_way_leaves_nothing_in_the_way(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "archive.sqlite.new").write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)  # killed mid-creation
    (out / "run.lock").write_text("pid 4242 on elsewhere\n")
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(out)]) == 0
    assert len(committed(out)) == 1 and not (out / "archive.sqlite.new").exists()


# -- workers and signals ----------------------------------------------------------------------------------
def test_the_whole_worker_pool_killed_at_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", out)
    gate.arm(1)
    config = emt_config(tmp_path, evaluations=6, workers=2, gated=True)
    process = globopt_process("run", str(config), "--out", str(out), cwd=tmp_path, env=gate.env)
    try:
        gate.wait(process)
        children = psutil.Process(process.pid).children(recursive=True)
        workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) >= 2
        for worker in workers:
            worker.kill()
        psutil.wait_procs(workers, timeout=PATIENCE)
        gate.release()
        output, _ = process.communicate(timeout=PATIENCE)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert output.count("worker process died") >= 2
    assert len(committed(out)) == 6


def test_sigterm_to_a_pool_run_leaves_no_worker_behind(tmp_path: Path) -> None:
    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", out)
    gate.arm(1)
    config = emt_config(tmp_path, evaluations=5, workers=2, gated=True)
    process = globopt_process("run", str(config), "--out", str(out), cwd=tmp_path, env=gate.env)
    try:
        gate.wait(process)
        workers = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=PATIENCE)
    finally:
        process.kill()
    assert process.returncode == 130, output
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"worker processes outlived the run: {alive}"
    before = committed(out)
    assert main(["resume", str(out)]) == 0
    after = committed(out)
    assert len(after) == 5 and {k: after[k] for k in before} == before


def test_ctrl_c_before_the_first_commit_keeps_the_run_resumable(tmp_path: Path) -> None:
    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", out)
    gate.arm(0)
    process = globopt_process(
        "run",
        str(emt_config(tmp_path, evaluations=2, gated=True)),
        "--out",
        str(out),
        cwd=tmp_path,
        env=gate.env,
    )
    try:
        gate.wait(process)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=PATIENCE)
    finally:
        process.kill()
    assert process.returncode == 130, output
    assert (out / "archive.sqlite").exists(), "an interruption is not a failure: the run stays"
    assert main(["resume", str(out)]) == 0
    assert len(committed(out)) == 2


# -- readers beside a writer ------------------------------------------------------------------------------
def test_status_while_commits_land(tmp_path: Path) -> None:
    """`status` beside a running run: always exit 0, counts never beyond what is committed, never falling."""
    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", out)
    gate.arm(2)
    config = emt_config(tmp_path, evaluations=8, gated=True)
    process = globopt_process("run", str(config), "--out", str(out), cwd=tmp_path, env=gate.env)
    seen = []
    try:
        gate.wait(process)
        held = globopt("status", str(out), cwd=tmp_path)
        assert held.returncode == 0, held.stderr
        assert "evaluations: 2/8" in held.stdout and "state: running" in held.stdout
        gate.release()
        while process.poll() is None:
            result = globopt("status", str(out), cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            seen.append(int(result.stdout.split("evaluations: ")[1].split("/")[0]))
        output, _ = process.communicate(timeout=PATIENCE)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert seen == sorted(seen) and all(2 <= n <= 8 for n in seen)
    assert "state: finished" in globopt("status", str(out), cwd=tmp_path).stdout


# -- files that went missing, moved or came from elsewhere -------------------------------------------------
def test_a_deleted_wal_file_after_a_kill_is_caught_before_results_csv_is_rewritten(
    tmp_path: Path, capsys
) -> None:
    _, out, _ = killed_run(tmp_path)
    listed = len(read_results(out))
    assert listed >= 2
    (out / "archive.sqlite-wal").unlink()  # "cleaning up" after a crash: the last commits were in there
    (out / "archive.sqlite-shm").unlink(missing_ok=True)
    kept = snapshot(out)
    capsys.readouterr()
    assert main(["resume", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"lists {listed} finished candidate(s)" in error and "archive.sqlite-wal was deleted" in error
    assert main(["run", str(emt_config(tmp_path, evaluations=4, gated=True)), "--out", str(out)]) == 2
    assert "archive.sqlite-wal was deleted" in capsys.readouterr().err
    assert main(["status", str(out)]) == 0
    assert "warning:" in capsys.readouterr().out
    assert {k: v for k, v in snapshot(out).items() if k.startswith(("results", "best"))} == {
        k: v for k, v in kept.items() if k.startswith(("results", "best"))
    }, "results.csv, the only record of those evaluations, is kept"


def test_an_archive_from_another_run_is_refused(tmp_path: Path, capsys) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert main(["run", str(emt_config(tmp_path, evaluations=2)), "--out", str(ours)]) == 0
    other = write_config(tmp_path, name="nial", composition="Ni2Al2", seed=1, budget={"evaluations": 2},
                         potential={"kind": "emt"})  # fmt: skip
    assert main(["run", str(other), "--out", str(theirs)]) == 0
    shutil.copy(theirs / "archive.sqlite", ours / "archive.sqlite")
    capsys.readouterr()
    assert main(["resume", str(ours)]) == 2
    error = capsys.readouterr().err
    assert (
        "or the archive belongs to another run" in error
        and "composition" in error
        and "name: nial -> cuau" in error
    )


def test_a_run_directory_moved_between_kill_and_resume(tmp_path: Path) -> None:
    _, out, before = killed_run(tmp_path)
    moved = tmp_path / "elsewhere" / "moved run"
    moved.parent.mkdir()
    out.rename(moved)
    assert main(["resume", str(moved)]) == 0
    after = committed(moved)
    assert len(after) == 4 and {k: after[k] for k in before} == before


@pytest.mark.parametrize("name", ["run with spaces", "run #1?x=2", "ünïcødé-run"])
def test_odd_characters_in_the_run_path(tmp_path: Path, name: str, capsys) -> None:
    out = tmp_path / name
    assert main(["run", str(emt_config(tmp_path, evaluations=2)), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "evaluations: 2/2" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert main(["run", str(emt_config(tmp_path, evaluations=3)), "--out", str(out), "--resume"]) == 0
    assert len(committed(out)) == 3


def test_status_and_report_on_a_machine_without_the_runs_inputs(tmp_path: Path, capsys) -> None:
    """A run copied to a laptop: its calculator module (like a model) is not there; reading still works,
    a resume names what is missing and changes nothing."""
    out = tmp_path / "run"
    module = tmp_path / "site" / "my_potential.py"
    module.parent.mkdir()
    module.write_text("from ase.calculators.emt import EMT as MyEMT\n")
    config = write_config(tmp_path, name="cuau", composition="Cu2Au2", seed=11, budget={"evaluations": 2},
                          potential={"kind": "ase", "calculator": "my_potential:MyEMT"})  # fmt: skip
    made = globopt(
        "run", str(config), "--out", str(out), cwd=tmp_path, env={"PYTHONPATH": str(module.parent)}
    )
    assert made.returncode == 0, made.stderr
    before = snapshot(out)
    status = globopt("status", str(out), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "potential=ase:my_potential:MyEMT" in status.stdout and "evaluations: 2/2" in status.stdout
    report = globopt("report", str(out), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    resume = globopt("resume", str(out), cwd=tmp_path)
    assert resume.returncode == 2 and "cannot import ASE calculator 'my_potential:MyEMT'" in resume.stderr
    assert "Traceback" not in resume.stderr
    assert {k: v for k, v in snapshot(out).items() if k != "run.lock"} == {
        k: v for k, v in before.items() if k != "run.lock"
    }


def test_a_screen_template_deleted_before_the_resume(tmp_path: Path, capsys) -> None:
    from pymatgen.core import Lattice, Structure

    template = tmp_path / "CuAu.cif"
    Structure(Lattice.cubic(3.0), ["Cu", "Au"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(template))
    config = write_config(
        tmp_path, name="screen", mode="htvs", potential={"kind": "emt"}, relax={"max_steps": 40},
        htvs={"templates": [{"file": "CuAu.cif"}], "substitutions": {"Cu": ["Ag"]}},
    )  # fmt: skip
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--resume"]) == 2  # nothing to resume yet
    assert main(["run", str(config), "--out", str(out)]) == 0
    template.unlink()
    before = snapshot(out)
    capsys.readouterr()
    assert main(["resume", str(out)]) == 2
    assert f"{template} does not exist" in capsys.readouterr().err
    assert main(["status", str(out)]) == 0
    assert {k: v for k, v in snapshot(out).items() if k != "run.lock"} == {
        k: v for k, v in before.items() if k != "run.lock"
    }


# -- the archive's contents ---------------------------------------------------------------------------------
def test_a_damaged_search_state_is_named(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=2)), "--out", str(out)]) == 0
    db = sqlite3.connect(out / "archive.sqlite")
    db.execute('UPDATE search_state SET value=\'{"kind": "random", "rng"\' WHERE key=\'state\'')
    db.commit()
    db.close()
    rows = read_results(out)
    capsys.readouterr()
    assert main(["run", str(emt_config(tmp_path, evaluations=3)), "--out", str(out), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "damaged" in error and "search state is not valid JSON" in error
    assert read_results(out) == rows
    db = sqlite3.connect(out / "archive.sqlite")
    db.execute("UPDATE search_state SET value=? WHERE key='state'", (json.dumps({"kind": "random"}),))
    db.commit()
    db.close()
    assert main(["run", str(emt_config(tmp_path, evaluations=3)), "--out", str(out), "--resume"]) == 2
    assert "search state does not fit a random search" in (out / "globopt.log").read_text()


def test_an_archive_write_locked_by_another_program(tmp_path: Path) -> None:
    """An sqlite3 session left open with a transaction: the run waits 30 s, then says who is in the way."""
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(out)]) == 0
    other = sqlite3.connect(out / "archive.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        result = globopt(
            "run", str(emt_config(tmp_path, evaluations=2)), "--out", str(out), "--resume", cwd=tmp_path
        )
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert result.returncode == 2, result.stderr
    assert (
        "another program has held a write lock on it" in result.stderr
        and "disk may be full" not in result.stderr
    )
    assert main(["run", str(emt_config(tmp_path, evaluations=2)), "--out", str(out), "--resume"]) == 0
    assert len(committed(out)) == 2


# -- inputs ---------------------------------------------------------------------------------------------
def test_config_files_with_crlf_a_bom_or_nothing_in_them(tmp_path: Path, capsys) -> None:
    text = "name: t\ncomposition: Cu2Au2\npotential: {kind: emt}\n"
    windows = tmp_path / "windows.yaml"
    windows.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert main(["validate", str(windows)]) == 0
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    capsys.readouterr()
    assert main(["validate", str(empty)]) == 2
    assert f"{empty}: expected a mapping of keys" in capsys.readouterr().err


def test_out_below_a_file(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "results"
    a_file.write_text("mine")
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(a_file / "run")]) == 2
    assert "cannot create the run directory" in capsys.readouterr().err
    assert a_file.read_text() == "mine"
