"""Helpers shared by the end-to-end tests: writing configs, reading run directories, running the CLI,
and the test's side of the gate that stops a run at a chosen point (tests/gate_calculator.py)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import yaml

TESTS = Path(__file__).resolve().parent
# The potential of every kill test: EMT behind the gate (a plain EMT while no gate is armed).
GATED_EMT = {"kind": "ase", "calculator": "gate_calculator:GatedEMT"}
# Safety nets only: no test waits this long unless something is broken.
PATIENCE = 900.0


def write_config(folder: Path, **fields) -> Path:
    path = folder / f"{fields['name']}.yaml"
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def emt_config(folder: Path, name: str = "cuau", evaluations: int = 6, gated: bool = False, **extra) -> Path:
    """Cu2Au2 with ASE's EMT: a real potential, ~1 s per relaxation. ``gated``: EMT behind the test gate."""
    return write_config(
        folder, name=name, composition="Cu2Au2", seed=11,
        budget=extra.pop("budget", {"evaluations": evaluations}),
        potential=GATED_EMT if gated else {"kind": "emt"}, **extra,
    )  # fmt: skip


def read_results(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def committed(run_dir: Path) -> dict[int, tuple]:
    """id -> (status, energy, finished_at) of every finished candidate that used the potential."""
    path = run_dir / "archive.sqlite"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=30)
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


def subprocess_environment(env: dict | None = None) -> dict[str, str]:
    """The environment of a globopt subprocess: ours plus ``env``, importing this checkout's globopt (not
    another installed copy) and the tests folder (the gate calculators); a PYTHONPATH in ``env`` is added."""
    env = dict(env or {})
    paths = [str(TESTS.parent), str(TESTS), env.pop("PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, **env, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _interruptible() -> None:
    """In the child, before exec: Ctrl-C back to its default. A test suite started in the background of a
    non-interactive shell (`pytest &`, some CI runners) inherits SIGINT ignored, and Python then installs
    no KeyboardInterrupt handler, so a test that sends SIGINT would wait on a run that never sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def globopt_process(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "globopt", *args],
        cwd=cwd,
        env=subprocess_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_interruptible,
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05, process=None) -> None:
    """Poll ``predicate``; fail early, with its output, if ``process`` ends first. ``timeout`` is a safety
    net for a broken run, never what a test relies on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            output = process.communicate()[0] if process.stdout else ""
            raise AssertionError(f"the process ended (code {process.returncode}) before {what}:\n{output}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Gate:
    """Stops a run using a gated potential (tests/gate_calculator.py) at a chosen number of commits.

    ``arm(after)`` before starting the process; ``wait(process)`` returns once one of the run's processes
    is blocked inside a relaxation with ``after`` evaluations committed; then the test kills what it wants,
    or ``release()``s the gate. Pass ``env`` to the process (or export it for mpiexec).
    """

    def __init__(self, folder: Path, run_dir: Path) -> None:
        self.folder = folder
        self.archive = run_dir / "archive.sqlite"
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {"GLOBOPT_TEST_GATE": str(self.folder)}

    def arm(self, after: int) -> None:
        for name in ("blocked", "release"):
            (self.folder / name).unlink(missing_ok=True)
        plan = self.folder / "plan.json"
        plan.write_text(json.dumps({"archive": str(self.archive), "after": after}))

    def wait(self, process: subprocess.Popen | None = None, timeout: float = PATIENCE) -> dict:
        """{'pid': the blocked process, 'committed': evaluations committed when it blocked}."""
        marker = self.folder / "blocked"
        wait_for(lambda: marker.exists() and marker.stat().st_size > 0, timeout, "the run to reach the gate",
                 process=process)  # fmt: skip
        return json.loads(marker.read_text())

    def release(self) -> None:
        (self.folder / "release").touch()


def sigkill_at_gate(*args: str, out: Path, cwd: Path, count: int, gate: Gate) -> dict[int, tuple]:
    """Run `globopt ARGS` (a gated config), SIGKILL it inside the relaxation after ``count`` commits; the
    committed rows.

    SIGKILL, not SIGTERM: no handler runs and nothing is flushed, as when a node dies or the batch system
    kills the job.
    """
    gate.arm(count)
    process = globopt_process(*args, cwd=cwd, env=gate.env)
    try:
        gate.wait(process)
    finally:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL, output
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


def read_only_command(folder: Path, args: list[str]) -> list[str] | None:
    """`globopt ARGS` seeing ``folder`` read-only, or None when this machine cannot arrange that.

    Not root: plain permissions do it (the caller makes the files read-only). Root ignores permissions, so
    the folder is bind-mounted read-only in a private mount namespace instead.
    """
    import shutil

    command = [sys.executable, "-m", "globopt", *args]
    if os.geteuid() != 0:
        return command
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    probe = subprocess.run(
        [unshare, "-m", "--propagation", "private", "sh", "-c", f"mount --bind -o ro {folder} {folder}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        return None
    script = f'mount --bind -o ro "{folder}" "{folder}" && exec "$@"'
    return [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh", *command]


class ReadOnly:
    """Run commands on a folder that is read-only to them (permissions, or a read-only bind mount)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def run(self, *args: str, cwd: Path) -> subprocess.CompletedProcess | None:
        command = read_only_command(self.folder, list(args))
        if command is None:
            return None
        modes = {p: p.stat().st_mode for p in [self.folder, *self.folder.rglob("*")]}
        if os.geteuid() != 0:
            for path in modes:
                path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            return subprocess.run(
                command,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=PATIENCE,
                env=subprocess_environment(),
            )
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
