"""Helpers shared by the end-to-end tests: writing configs, reading run directories, running the CLI."""

from __future__ import annotations

import csv
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml


def write_config(folder: Path, **fields) -> Path:
    path = folder / f"{fields['name']}.yaml"
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def emt_config(folder: Path, name: str = "cuau", evaluations: int = 6, **extra) -> Path:
    """Cu2Au2 with ASE's EMT: a real potential, ~1 s per relaxation."""
    return write_config(
        folder, name=name, composition="Cu2Au2", seed=11,
        budget=extra.pop("budget", {"evaluations": evaluations}), potential={"kind": "emt"}, **extra,
    )  # fmt: skip


def read_results(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def committed(run_dir: Path) -> dict[int, tuple]:
    """id -> (status, energy, finished_at) of every finished candidate that used the potential."""
    path = run_dir / "archive.sqlite"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute(
            "SELECT id, status, energy, finished_at FROM candidates"
            " WHERE status NOT IN ('pending', 'rejected', 'duplicate')"
        ).fetchall()
    except sqlite3.OperationalError:  # schema not created yet
        return {}
    finally:
        db.close()
    return {r[0]: tuple(r[1:]) for r in rows}


def globopt_process(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "globopt", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sigkill_after_commits(*args: str, out: Path, cwd: Path, count: int, timeout: float) -> dict[int, tuple]:
    """Run `globopt ARGS`, SIGKILL it once ``count`` evaluations are committed in ``out``; those rows.

    SIGKILL, not SIGTERM: no handler runs and nothing is flushed, as when a node dies or the batch system
    kills the job.
    """
    process = globopt_process(*args, cwd=cwd)
    try:
        wait_for(lambda: len(committed(out)) >= count, timeout=timeout, what=f"{count} committed evaluations")
    finally:
        process.kill()
        process.communicate()
    return committed(out)


LOGGED_EVALUATION = re.compile(r"\] id=(\d+) ")


def logged_ids(run_dir: Path) -> list[int]:
    """Candidate ids of the per-evaluation lines in globopt.log, in order, repeats kept."""
    return [int(i) for i in LOGGED_EVALUATION.findall((run_dir / "globopt.log").read_text())]


def assert_logged_once_across_a_kill(run_dir: Path, before_kill: dict, after_resume: dict) -> None:
    """No evaluation logged twice or without its commit; every evaluation after the kill logged.

    The archive is committed before the log line is written, on purpose (the line claims a durable result),
    so a SIGKILL between the two may leave the last evaluations before the kill committed but unlogged.
    """
    logged = logged_ids(run_dir)
    assert len(logged) == len(set(logged)), f"an evaluation was logged twice: {logged}"
    assert set(logged) <= set(after_resume), "a logged evaluation is not in the archive"
    assert set(after_resume) - set(before_kill) <= set(logged), "an evaluation after the kill is not logged"
