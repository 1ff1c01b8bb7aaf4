"""What `run`, `resume`, `status` and `report` do to a run directory that is not what they expect.

Nothing a user has written may be overwritten or lost: a directory holding anything but a resumable run is
refused, a damaged archive is named as damage (never taken for a new run), the archive's own copy of the
config guards what a resume may change, and `status` / `report` only read. EMT throughout (these are about
files, not physics), the real M3GNet where the case is about the model.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    PATIENCE,
    Gate,
    ReadOnly,
    committed,
    emt_config,
    globopt_process,
    read_results,
    subprocess_environment,
    write_config,
)

from globopt.cli import main


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes): what must survive a refused command."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 3-evaluation EMT run; tests copy it before changing anything."""
    folder = tmp_path_factory.mktemp("finished")
    assert main(["run", str(emt_config(folder, evaluations=3)), "--out", str(folder / "run")]) == 0
    return folder / "run"


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# -- run into a directory that is not free ----------------------------------------------------------------
def test_run_refuses_a_directory_holding_other_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    (out / "best").mkdir(parents=True)
    (out / "config.yaml").write_text("my notes\n")
    (out / "results.csv").write_text("my,results\n")
    (out / "best" / "keep.cif").write_text("data_keep\n")
    (out / "notes.txt").write_text("keep me\n")
    before = snapshot(out)
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{out} holds the results of a run" in error and "no archive.sqlite" in error
    assert snapshot(out) == before, "nothing in the directory was touched"

    (out / "results.csv").unlink()
    shutil.rmtree(out / "best")
    before = snapshot(out)
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{out} is not empty (config.yaml, notes.txt)" in error and "--out" in error
    assert snapshot(out) == before


def test_run_refuses_a_directory_holding_only_the_users_config(tmp_path: Path, capsys) -> None:
    out = tmp_path / "project"
    out.mkdir()
    config = emt_config(out, name="config", evaluations=1)
    config.rename(out / "config.yaml")
    before = snapshot(out)
    assert main(["run", str(out / "config.yaml"), "--out", str(out)]) == 2
    assert "would overwrite yours" in capsys.readouterr().err
    assert snapshot(out) == before


def test_run_refuses_a_run_whose_archive_was_deleted(finished: Path, tmp_path: Path, capsys) -> None:
    out = copy_of(finished, tmp_path)
    (out / "archive.sqlite").unlink()
    before = snapshot(out)
    assert main(["run", str(emt_config(tmp_path, evaluations=3)), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "the archive was deleted or moved" in error and f"globopt resume {out}" in error
    assert snapshot(out) == before, "results.csv, best/ and config.yaml are kept as they were"
    assert main(["resume", str(out)]) == 2
    assert "restore it" in capsys.readouterr().err
    assert snapshot(out) == before


def test_run_into_an_empty_directory_or_onto_a_file(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(empty)]) == 0
    assert len(committed(empty)) == 1
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["run", str(emt_config(tmp_path, evaluations=1)), "--out", str(a_file)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert a_file.read_text() == "x"


# -- an empty or unreadable archive is damage, never a new run ----------------------------------------------
def test_zero_byte_archive_is_damage_for_every_command(finished: Path, tmp_path: Path, capsys) -> None:
    out = copy_of(finished, tmp_path)
    (out / "archive.sqlite").write_bytes(b"")
    before = snapshot(out)
    commands = [
        ["status", str(out)],
        ["report", str(out), "--out", str(tmp_path / "report")],
        ["resume", str(out)],
        ["run", str(emt_config(tmp_path, evaluations=3)), "--out", str(out)],
        ["run", str(emt_config(tmp_path, evaluations=3)), "--out", str(out), "--resume"],
    ]
    for command in commands:
        assert main(command) == 2, command
        error = capsys.readouterr().err
        assert f"the run archive {out / 'archive.sqlite'} is damaged" in error, (command, error)
        assert "empty (0 bytes)" in error and "backup" in error and "results.csv" in error
        assert snapshot(out) == before, f"{command} changed the run directory"


# -- the archive's copy of the config ---------------------------------------------------------------------
def test_hand_edited_config_cannot_change_the_search_on_resume(
    finished: Path, tmp_path: Path, capsys
) -> None:
    out = copy_of(finished, tmp_path)
    config_path = out / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["composition"] = {"Cu": 4, "Au": 4}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    archive_before = committed(out)
    assert main(["resume", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{config_path} does not match the config this run was made with" in error
    assert "composition.Cu: 2 -> 4" in error and "composition.Au: 2 -> 4" in error
    assert committed(out) == archive_before
    shutil.copy(finished / "config.yaml", config_path)
    # a new config that changes the search is refused the same way
    changed = emt_config(tmp_path, evaluations=4, relax={"fmax": 0.2})
    assert main(["run", str(changed), "--out", str(out), "--resume"]) == 2
    assert "changes relax (relax.fmax: 0.05 -> 0.2)" in capsys.readouterr().err


def test_budget_edited_in_config_yaml_is_honoured(finished: Path, tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    config_path = out / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["budget"]["evaluations"] = 4
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["resume", str(out)]) == 0
    assert len(committed(out)) == 4


def test_deleted_config_yaml_is_restored_from_the_archive(finished: Path, tmp_path: Path, capsys) -> None:
    out = copy_of(finished, tmp_path)
    original = (out / "config.yaml").read_text()
    (out / "config.yaml").unlink()
    assert main(["status", str(out)]) == 0
    assert "run cuau: mode=random composition=Cu2Au2 potential=emt" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert not (out / "config.yaml").exists(), "status and report only read"
    assert main(["resume", str(out)]) == 0
    assert (out / "config.yaml").read_text() == original
    assert "config.yaml is missing: restored from the copy in" in (out / "globopt.log").read_text()


def test_an_archive_without_its_config_copy_falls_back_to_config_yaml(
    finished: Path, tmp_path: Path, capsys
) -> None:
    """Archives written before the copy existed: config.yaml is used (and said to be), and copied in."""
    out = copy_of(finished, tmp_path)
    db = sqlite3.connect(out / "archive.sqlite")
    db.execute("DELETE FROM meta WHERE key='config'")
    db.commit()
    db.close()
    assert main(["status", str(out)]) == 0
    assert "config from config.yaml (this archive predates its own copy)" in capsys.readouterr().out
    bigger = emt_config(tmp_path, evaluations=4)
    assert main(["run", str(bigger), "--out", str(out), "--resume"]) == 0
    assert "keeps no copy of its config" in (out / "globopt.log").read_text()
    db = sqlite3.connect(out / "archive.sqlite")
    stored = db.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0]
    db.close()
    assert yaml.safe_load(stored)["budget"]["evaluations"] == 4
    (out / "config.yaml").unlink()
    assert main(["status", str(out)]) == 0
    assert "evaluations: 4/4" in capsys.readouterr().out


# -- a run that fails before its first commit leaves nothing in the way --------------------------------------
@pytest.mark.m3gnet
def test_a_run_that_fails_before_any_commit_leaves_nothing_that_blocks_the_retry(
    tmp_path: Path, models_dir: Path
) -> None:
    """A model folder that passes the cheap checks but cannot be loaded (state.pt from another file): the
    run fails in its first relaxation; the corrected config then runs in the same directory."""
    models = tmp_path / "models"
    shutil.copytree(models_dir / "M3GNet-MP-2021.2.8-PES", models / "M3GNet-MP-2021.2.8-PES")
    broken = models / "M3GNet-MP-2021.2.8-PES"
    for path in broken.iterdir():
        path.chmod(0o644)
    shutil.copy(broken / "model.pt", broken / "state.pt")
    config = write_config(
        tmp_path, name="nacl", composition="Na4Cl4", seed=5, budget={"evaluations": 1},
        potential={"model": str(broken)},
    )  # fmt: skip
    out = tmp_path / "run"
    process = subprocess.run(
        [sys.executable, "-m", "globopt", "run", str(config), "--out", str(out)],
        capture_output=True, text=True, timeout=PATIENCE, env=subprocess_environment(),
    )  # fmt: skip
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    assert f"{broken / 'state.pt'} does not match" in process.stderr and "copy the complete" in process.stderr
    assert "nothing was committed, so" in process.stderr
    assert sorted(p.name for p in out.iterdir()) == ["globopt.log"]
    fixed = write_config(
        tmp_path, name="nacl", composition="Na4Cl4", seed=5, budget={"evaluations": 1},
        potential={"model": "M3GNet-MP-2021.2.8-PES"},
    )  # fmt: skip
    assert main(["run", str(fixed), "--out", str(out)]) == 0
    assert len(committed(out)) == 1


def test_a_run_killed_before_its_first_commit_is_replaced_by_a_new_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", out)
    gate.arm(0)  # held inside the very first relaxation
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
    finally:
        process.kill()
        process.communicate()
    assert committed(out) == {}
    other = emt_config(tmp_path, name="other", evaluations=2, relax={"fmax": 0.1})
    assert main(["run", str(other), "--out", str(out)]) == 0
    assert len(committed(out)) == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["name"] == "other"
    assert "never committed an evaluation; starting over" in (out / "globopt.log").read_text()


# -- status and report only read --------------------------------------------------------------------------
def test_status_and_report_regenerate_deleted_outputs(finished: Path, tmp_path: Path, capsys) -> None:
    out = copy_of(finished, tmp_path)
    rows = read_results(out)
    best = sorted(p.name for p in (out / "best").iterdir())
    (out / "results.csv").unlink()
    shutil.rmtree(out / "best")
    assert main(["status", str(out)]) == 0
    assert "results.csv and best/ were missing: regenerated from the archive" in capsys.readouterr().out
    assert read_results(out) == rows
    assert sorted(p.name for p in (out / "best").iterdir()) == best
    (out / "results.csv").unlink()
    assert main(["report", str(out)]) == 0
    assert read_results(out) == rows


def test_status_and_report_on_a_read_only_run(finished: Path, tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    (out / "results.csv").unlink()
    before = snapshot(out)
    read_only = ReadOnly(out)
    status = read_only.run("status", str(out), cwd=tmp_path)
    if status is None:
        pytest.skip("running as root without mount namespaces: cannot make a directory read-only")
    assert status.returncode == 0, status.stderr
    assert "evaluations: 3/3" in status.stdout and "state: finished" in status.stdout
    assert "results.csv missing and not regenerated" in status.stdout and "read-only" in status.stdout
    for text in ("disk may be full", "globopt resume", "Traceback"):
        assert text not in status.stdout + status.stderr
    elsewhere = tmp_path / "elsewhere"
    report = read_only.run("report", str(out), "--out", str(elsewhere), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert (elsewhere / "convergence.png").stat().st_size > 10_000 and (elsewhere / "summary.md").exists()
    default = read_only.run("report", str(out), cwd=tmp_path)
    assert default.returncode == 2
    assert f"cannot write the report into {out / 'report'}" in default.stderr and "--out" in default.stderr
    assert "Traceback" not in default.stderr
    assert snapshot(out) == before


def test_status_says_whether_the_run_is_running_or_was_killed(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", out)
    gate.arm(1)
    process = globopt_process(
        "run",
        str(emt_config(tmp_path, evaluations=3, gated=True)),
        "--out",
        str(out),
        cwd=tmp_path,
        env=gate.env,
    )
    try:
        gate.wait(process)
        capsys.readouterr()
        assert main(["status", str(out)]) == 0
        running = capsys.readouterr().out
        assert f"state: running (pid {process.pid} on " in running
        assert "evaluations: 1/3" in running and "potential=ase:gate_calculator:GatedEMT" in running
    finally:
        process.kill()
        process.communicate()
    assert main(["status", str(out)]) == 0
    killed = capsys.readouterr().out
    assert "state: not running: 1 candidate(s) in flight" in killed and f"`globopt resume {out}`" in killed


def test_status_piped_into_head_ends_quietly(finished: Path, tmp_path: Path) -> None:
    command = f"{sys.executable} -m globopt status {finished} | head -1"
    process = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=PATIENCE,
        env=subprocess_environment(),
    )  # fmt: skip
    assert process.stdout.startswith("run cuau:") and process.stdout.count("\n") == 1
    assert "Traceback" not in process.stderr and "BrokenPipe" not in process.stderr, process.stderr
    assert process.returncode == 0


def test_lowered_budget_on_resume_says_there_is_nothing_to_do(finished: Path, tmp_path: Path, capsys) -> None:
    out = copy_of(finished, tmp_path)
    smaller = emt_config(tmp_path, evaluations=2)
    assert main(["run", str(smaller), "--out", str(out), "--resume"]) == 0
    log = (out / "globopt.log").read_text().split("run cuau:")[-1]
    assert "nothing to do: 3 evaluations were committed before and the budget is 2" in log
    assert log.count("best:") == 1
    assert "3/2" not in log
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "evaluations: 3 committed; budget.evaluations is 2" in capsys.readouterr().out


def test_emt_runs_are_labelled_emt(finished: Path, capsys) -> None:
    assert main(["status", str(finished)]) == 0
    assert "potential=emt\n" in capsys.readouterr().out
    assert "potential emt, output" in (finished / "globopt.log").read_text()
    assert "M3GNet" not in (finished / "config.yaml").read_text()
