"""Fault injection with real processes and a real (cheap) potential: what cluster life does to a run.

EMT stands in for M3GNet here because these tests are about the bookkeeping (archive, lock, resume), not
the physics; the single SIGKILL + resume with the real M3GNet is in test_m3gnet_runs.py, a killed pool
worker in test_engine.py, a killed MPI rank in test_mpi.py.

Failures are injected at the operating-system level, never by faking code: SIGKILL, RLIMIT_FSIZE (a disk
that stops taking bytes), a read-only mount or permissions, bytes overwritten in the archive file.
"""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    PATIENCE,
    Gate,
    committed,
    emt_config,
    globopt_process,
    logged_ids,
    read_only_command,
    read_results,
)

from globopt.archive import Archive
from globopt.cli import main


def _integrity(path: Path) -> str:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def _assert_kept(before: dict[int, tuple], after: dict[int, tuple]) -> None:
    """Every evaluation committed before is still there, unchanged (not recomputed, not lost)."""
    missing = sorted(set(before) - set(after))
    assert not missing, f"committed evaluations lost: {missing}"
    changed = sorted(k for k in before if after[k] != before[k])
    assert not changed, f"committed evaluations rewritten: {changed}"


def test_repeated_sigkill_of_the_master_then_resume(tmp_path: Path) -> None:
    """Three SIGKILLs, each inside a relaxation after a chosen number of commits, then resume to the end.

    The gate (tests/gate_calculator.py) holds the run inside the relaxation that follows the chosen commit,
    so every kill lands with exactly that many evaluations committed and one candidate in flight, however
    fast or slow the machine. The final archive must hold exactly the budget, every evaluation committed
    before any kill unchanged, and no candidate evaluated twice (each id is logged at most once).
    """
    budget = 16
    config = emt_config(tmp_path, evaluations=budget, gated=True, mode="ga", ga={"population_size": 4})
    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", out)
    snapshots: list[dict[int, tuple]] = []
    for kill, after in enumerate((2, 7, 13)):
        args = ("run", str(config), "--out", str(out)) if kill == 0 else ("resume", str(out))
        gate.arm(after)
        process = globopt_process(*args, cwd=tmp_path, env=gate.env)
        try:
            blocked = gate.wait(process)
        finally:
            process.kill()  # SIGKILL: no handler, no flush, no lock release except by the OS
            output, _ = process.communicate()
        assert process.returncode == -signal.SIGKILL, output
        assert blocked == {"pid": process.pid, "committed": after}
        snapshot = committed(out)
        assert len(snapshot) == after, "the kill landed after exactly the chosen commits"
        assert _integrity(out / "archive.sqlite") == "ok"
        assert _pending(out) == 1, "one candidate was in flight at the kill"
        if snapshots:
            _assert_kept(snapshots[-1], snapshot)
        snapshots.append(snapshot)

    final = globopt_process("resume", str(out), cwd=tmp_path)
    output, _ = final.communicate(timeout=PATIENCE)
    assert final.returncode == 0, output
    after = committed(out)
    assert len(after) == budget  # the budget is exact across four sessions
    for snapshot in snapshots:
        _assert_kept(snapshot, after)
    archive = Archive(out / "archive.sqlite")
    try:
        assert archive.count_used_potential() == budget
        assert not archive.pending_tasks()
    finally:
        archive.close()
    logged = logged_ids(out)
    assert len(logged) == len(set(logged)), "a candidate was evaluated twice"
    assert set(logged) <= set(after)
    rows = read_results(out)
    assert len({r["id"] for r in rows}) == len(rows)
    assert {int(r["id"]) for r in rows if r["status"] not in ("rejected", "duplicate")} == set(after)


def _pending(run_dir: Path) -> int:
    db = sqlite3.connect(f"file:{run_dir / 'archive.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM candidates WHERE status='pending'").fetchone()[0]
    finally:
        db.close()


def _limit_file_size(limit: int):
    def apply() -> None:
        # SIGXFSZ would kill the process; ignored, the write fails with EFBIG like on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    """Writes start failing mid-run: clear error and non-zero exit, archive intact, resume completes."""
    config = emt_config(tmp_path, evaluations=500)
    out = tmp_path / "run"
    process = subprocess.run(
        [sys.executable, "-m", "globopt", "run", str(config), "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        preexec_fn=_limit_file_size(128 * 1024),
    )  # fmt: skip
    output = process.stdout + process.stderr
    assert process.returncode == 2, output
    assert "Traceback" not in output
    assert "cannot write to the run" in output and f"globopt resume {out}" in output
    assert _integrity(out / "archive.sqlite") == "ok"
    before = committed(out)
    assert 1 <= len(before) < 500

    budget = len(before) + 2
    resumed = emt_config(tmp_path, name="cuau", evaluations=budget)
    assert main(["run", str(resumed), "--out", str(out), "--resume"]) == 0
    after = committed(out)
    assert len(after) == budget
    _assert_kept(before, after)


def test_read_only_run_directory_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=2)), "--out", str(out)]) == 0
    before = committed(out)
    bigger = emt_config(tmp_path, evaluations=4)
    command = read_only_command(out, ["run", str(bigger), "--out", str(out), "--resume"])
    if command is None:
        pytest.skip("running as root without mount namespaces: cannot make a directory read-only")
    modes = {p: p.stat().st_mode for p in [out, *out.rglob("*")]}
    if os.geteuid() != 0:
        for path in modes:
            path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        process = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    output = process.stdout + process.stderr
    assert process.returncode == 2, output
    assert "Traceback" not in output
    assert f"cannot write to the run directory {out}" in output
    assert _integrity(out / "archive.sqlite") == "ok"
    assert committed(out) == before


@pytest.mark.parametrize("damage", ["garbage header", "truncated", "garbage pages"])
def test_damaged_archive_is_named_with_a_way_to_recover(tmp_path: Path, capsys, damage: str) -> None:
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=3)), "--out", str(out)]) == 0
    archive = out / "archive.sqlite"
    data = bytearray(archive.read_bytes())
    if damage == "garbage header":
        data[:100] = os.urandom(100)
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:  # every page after the first overwritten: the header still says SQLite
        data[4096:] = b"\xa5" * (len(data) - 4096)
    archive.write_bytes(bytes(data))
    capsys.readouterr()
    for command in (["resume", str(out)], ["status", str(out)], ["report", str(out)]):
        assert main(command) == 2, command
        error = capsys.readouterr().err
        assert "Traceback" not in error
        assert f"the run archive {archive} is damaged" in error, (command, error)
        assert ".recover" in error and "backup" in error and "results.csv" in error


def test_damaged_stored_config_is_named(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(out)]) == 0
    (out / "config.yaml").write_bytes(b"\x00\xffnot: [yaml")
    capsys.readouterr()
    assert main(["resume", str(out)]) == 2
    assert f"{out / 'config.yaml'}" in capsys.readouterr().err


def test_resume_racing_a_running_resume_is_refused(tmp_path: Path) -> None:
    """Two `globopt resume` of one directory: the second refuses and names the holder; nothing breaks.

    The first is held by the gate inside a relaxation, so it is certainly running while the second tries.
    """
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=1, gated=True)), "--out", str(out)]) == 0
    longer = emt_config(tmp_path, evaluations=40, gated=True)
    gate = Gate(tmp_path / "gate", out)
    gate.arm(2)
    first = globopt_process("run", str(longer), "--out", str(out), "--resume", cwd=tmp_path, env=gate.env)
    try:
        gate.wait(first)
        second = globopt_process("resume", str(out), cwd=tmp_path)
        output, _ = second.communicate(timeout=PATIENCE)
        assert second.returncode == 2, output
        assert f"is being written by pid {first.pid}" in output
        assert first.poll() is None, "the refused second process must not disturb the first"
    finally:
        first.send_signal(signal.SIGTERM)  # graceful stop: in-flight work is re-issued on the next resume
        first_output, _ = first.communicate(timeout=PATIENCE)
    assert first.returncode == 130, first_output
    assert "interrupted" in first_output
    assert _integrity(out / "archive.sqlite") == "ok"
    assert len(committed(out)) == 2 and _pending(out) == 1
    rows = read_results(out)
    assert len({r["id"] for r in rows}) == len(rows)
