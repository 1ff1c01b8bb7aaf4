"""End-to-end runs with the real M3GNet: the bundled example, and SIGKILL + resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import (
    PATIENCE,
    Gate,
    assert_logged_once_across_a_kill,
    committed,
    globopt_process,
    read_results,
    sigkill_at_gate,
    write_config,
)

from globopt.cli import main

pytestmark = pytest.mark.m3gnet
REPO = Path(__file__).resolve().parents[1]


def test_bundled_example_finds_rock_salt(tmp_path: Path, models_dir: Path) -> None:
    """The README's run command: runs/examples/nacl.yaml must find Fm-3m NaCl within its budget."""
    config = tmp_path / "nacl.yaml"
    shutil.copy(REPO / "runs" / "examples" / "nacl.yaml", config)
    out = tmp_path / "nacl"
    assert main(["run", str(config), "--out", str(out)]) == 0
    best = sorted((out / "best").glob("*.cif"))
    assert best[0].name.startswith("001_NaCl_Fm-3m_id")
    rows = {int(r["id"]): r for r in read_results(out)}
    top = rows[int(best[0].stem.split("_id")[-1])]
    # rock salt with M3GNet-MP-2021.2.8: a = 5.692 Å, -3.3675 eV/atom (shared/models/README.md)
    assert float(top["energy_per_atom"]) == pytest.approx(-3.3675, abs=3e-3)
    # fmax 0.05 eV/Å leaves up to ~0.35 GPa of residual stress on 8 atoms; NaCl's bulk modulus (~25 GPa)
    # turns that into ~1.5% of volume
    assert float(top["volume_per_atom"]) == pytest.approx(5.692**3 / 8, rel=0.025)


def test_sigkill_then_resume_loses_nothing_and_repeats_nothing(tmp_path: Path, models_dir: Path) -> None:
    """The real M3GNet (globopt's own loader, behind the test gate), killed inside its fourth relaxation."""
    budget = 10
    config = write_config(
        tmp_path, name="nacl", composition="Na4Cl4", seed=5, budget={"evaluations": budget},
        potential={"kind": "ase", "calculator": "gate_calculator:GatedM3GNet",
                   "calculator_kwargs": {"model": "M3GNet-MP-2021.2.8-PES"}},
    )  # fmt: skip
    out = tmp_path / "run"
    before = sigkill_at_gate(
        "run",
        str(config),
        "--out",
        str(out),
        out=out,
        cwd=tmp_path,
        count=3,
        gate=Gate(tmp_path / "gate", out),
    )
    assert len(before) == 3

    second = globopt_process("resume", str(out), cwd=tmp_path)
    output, _ = second.communicate(timeout=PATIENCE)
    assert second.returncode == 0, output
    after = committed(out)
    assert len(after) == budget  # the budget counts across the restart
    assert {k: after[k] for k in before} == before  # committed results untouched, not recomputed
    assert_logged_once_across_a_kill(out, before, after)
    rows = read_results(out)
    assert len({r["id"] for r in rows}) == len(rows)
    assert {int(r["id"]) for r in rows if r["status"] not in ("rejected", "duplicate")} == set(after)
    relaxed = [float(r["energy_per_atom"]) for r in rows if r["status"] == "relaxed"]
    assert relaxed and all(e < -2.5 for e in relaxed), "M3GNet energies of NaCl (rock salt: -3.37 eV/atom)"
