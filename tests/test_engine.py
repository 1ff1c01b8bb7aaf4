"""The whole loop with a cheap real potential (EMT): run directory, outputs, resume, lock, CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import committed, emt_config, read_results

from globopt.cli import main
from globopt.rundir import RunDirectory, RunDirError

REQUIRED_COLUMNS = {"id", "status", "origin", "energy_per_atom", "spacegroup", "n_steps", "seconds"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("engine")
    config = emt_config(folder, evaluations=6)
    assert main(["run", str(config), "--out", str(folder / "run")]) == 0
    return folder / "run"


def test_run_directory_layout(finished_run: Path) -> None:
    for name in ("config.yaml", "archive.sqlite", "results.csv", "globopt.log", "run.lock"):
        assert (finished_run / name).exists(), name
    log = (finished_run / "globopt.log").read_text()
    assert log.count("[6/6]") == 1 and "best:" in log


def test_results_table_has_one_row_per_candidate(finished_run: Path) -> None:
    rows = read_results(finished_run)
    assert set(rows[0]) >= REQUIRED_COLUMNS
    ids = [int(r["id"]) for r in rows]
    assert ids == sorted(set(ids))
    evaluated = [r for r in rows if r["status"] not in ("rejected", "duplicate")]
    assert len(evaluated) == 6
    assert all(r["origin"].startswith("random:sg") for r in rows)
    relaxed = [r for r in evaluated if r["status"] == "relaxed"]
    assert relaxed, "EMT relaxations of Cu2Au2 should converge"
    for r in relaxed:
        assert float(r["energy_per_atom"]) < 1.0 and int(r["n_steps"]) > 0 and float(r["seconds"]) > 0
        assert r["spacegroup"]


def test_best_structures_are_unique_and_sorted(finished_run: Path) -> None:
    from pymatgen.core import Composition, Structure

    rows = {int(r["id"]): r for r in read_results(finished_run)}
    files = sorted((finished_run / "best").glob("*.cif"))
    assert files
    energies = []
    for path in files:
        candidate = int(path.stem.split("_id")[-1])
        assert rows[candidate]["status"] == "relaxed" and rows[candidate]["duplicate_of"] == ""
        energies.append(float(rows[candidate]["enthalpy_per_atom"]))
        assert Structure.from_file(path).composition.reduced_composition == Composition("CuAu")
    assert energies == sorted(energies)
    relaxed = [float(r["enthalpy_per_atom"]) for r in rows.values() if r["status"] == "relaxed"]
    assert energies[0] == min(relaxed)


def test_status_and_report(finished_run: Path, capsys) -> None:
    assert main(["status", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "evaluations: 6/6" in out and "best unique structures" in out
    assert main(["report", str(finished_run)]) == 0
    assert (finished_run / "report" / "convergence.png").stat().st_size > 10_000
    assert "Run report" in (finished_run / "report" / "summary.md").read_text()


def test_existing_run_is_not_overwritten(finished_run: Path, capsys) -> None:
    config = finished_run / "config.yaml"
    before = (finished_run / "archive.sqlite").stat().st_mtime
    assert main(["run", str(config), "--out", str(finished_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (finished_run / "archive.sqlite").stat().st_mtime == before


def test_resume_with_bigger_budget_continues_without_repeating(tmp_path: Path) -> None:
    config = emt_config(tmp_path, evaluations=3)
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out)]) == 0
    first = committed(out)
    assert len(first) == 3
    bigger = emt_config(tmp_path, name="cuau", evaluations=5)
    assert main(["run", str(bigger), "--out", str(out), "--resume"]) == 0
    second = committed(out)
    assert len(second) == 5
    assert {k: second[k] for k in first} == first  # nothing re-evaluated
    # the search continued from its stored RNG state: no candidate structure was proposed twice
    origins = [r["origin"] for r in read_results(out)]
    assert len(origins) == len({int(r["id"]) for r in read_results(out)})


def test_run_stops_at_the_target_enthalpy_and_resume_without_it_continues(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert main(["run", str(emt_config(tmp_path, evaluations=5)), "--out", str(reference)]) == 0
    energies = [float(r["enthalpy_per_atom"]) for r in read_results(reference) if r["status"] == "relaxed"]
    assert len(energies) >= 3
    # the same seed proposes the same candidates: aim at the lowest of the first three
    target = min(energies[:3]) + 1e-5  # results.csv rounds to 1e-6
    stop_after = next(i for i, e in enumerate(energies, start=1) if e <= target)
    out = tmp_path / "run"
    targeted = emt_config(tmp_path, budget={"evaluations": 5, "target_enthalpy_per_atom": target})
    assert main(["run", str(targeted), "--out", str(out)]) == 0
    relaxed = [r for r in read_results(out) if r["status"] == "relaxed"]
    assert len(relaxed) == stop_after
    assert "target reached" in (out / "globopt.log").read_text()
    assert main(["resume", str(out)]) == 0  # still reached: nothing new is started
    assert len([r for r in read_results(out) if r["status"] == "relaxed"]) == stop_after
    assert main(["run", str(emt_config(tmp_path, evaluations=5)), "--out", str(out), "--resume"]) == 0
    assert [float(r["enthalpy_per_atom"]) for r in read_results(out) if r["status"] == "relaxed"] == energies


def test_force_call_budget_stops_the_run_and_counts_across_a_resume(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert main(["run", str(emt_config(tmp_path, evaluations=5)), "--out", str(reference)]) == 0
    evaluated = [r for r in read_results(reference) if r["n_force_calls"]]
    calls = [int(r["n_force_calls"]) for r in evaluated]
    assert len(calls) == 5 and all(c > 0 for c in calls)
    # a budget reached during the second relaxation: that one finishes, no third is started
    limit = calls[0] + 1
    out = tmp_path / "run"
    limited = emt_config(tmp_path, budget={"evaluations": 5, "force_calls": limit})
    assert main(["run", str(limited), "--out", str(out)]) == 0
    assert [int(r["n_force_calls"]) for r in read_results(out) if r["n_force_calls"]] == calls[:2]
    assert "force-call budget spent" in (out / "globopt.log").read_text()
    assert main(["resume", str(out)]) == 0  # the calls already spent count: nothing new is started
    assert len([r for r in read_results(out) if r["n_force_calls"]]) == 2
    # a bigger budget continues the same search up to it
    bigger = emt_config(tmp_path, budget={"evaluations": 5, "force_calls": sum(calls[:3])})
    assert main(["run", str(bigger), "--out", str(out), "--resume"]) == 0
    assert [int(r["n_force_calls"]) for r in read_results(out) if r["n_force_calls"]] == calls[:3]


def test_resume_refuses_a_changed_search(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(out)]) == 0
    changed = emt_config(tmp_path, evaluations=2, relax={"fmax": 0.2})
    assert main(["run", str(changed), "--out", str(out), "--resume"]) == 2
    assert "changes relax" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "nowhere")]) == 2


def test_second_writer_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(out)]) == 0
    holder = RunDirectory(out)
    holder.acquire_lock()
    try:
        with pytest.raises(RunDirError, match="being written by pid"):
            RunDirectory(out).acquire_lock()
        assert main(["resume", str(out)]) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    finally:
        holder.release_lock()


def test_two_worker_processes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", str(emt_config(tmp_path, evaluations=4, workers=2)), "--out", str(out)]) == 0
    rows = [r for r in read_results(out) if r["status"] not in ("rejected", "duplicate")]
    assert len(rows) == 4
    assert len({r["worker"] for r in rows}) == 2, "both worker processes should have relaxed candidates"


def test_killed_worker_process_does_not_stop_the_run(tmp_path: Path) -> None:
    """A pool worker SIGKILLed inside a relaxation: its candidate is re-issued and the run completes.

    The gate holds one worker inside its relaxation after the first commit, so the kill certainly hits a
    worker with a candidate in hand, and the run cannot have ended before.
    """
    import psutil
    from helpers import PATIENCE, Gate, globopt_process

    out = tmp_path / "run"
    config = emt_config(tmp_path, evaluations=8, workers=2, gated=True)
    gate = Gate(tmp_path / "gate", out)
    gate.arm(1)
    process = globopt_process("run", str(config), "--out", str(out), cwd=tmp_path, env=gate.env)
    try:
        blocked = gate.wait(process)
        victim = psutil.Process(blocked["pid"])
        assert victim in psutil.Process(process.pid).children(recursive=True), "a pool worker is blocked"
        victim.kill()
        victim.wait(timeout=PATIENCE)
        gate.release()
        output, _ = process.communicate(timeout=PATIENCE)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "worker process died" in output and "re-issuing" in output
    assert len(committed(out)) == 8
    attempts = {int(r["id"]): int(r["attempts"]) for r in read_results(out) if r["attempts"]}
    assert sorted(attempts.values())[-1] == 2, "the dead worker's candidate was issued a second time"
