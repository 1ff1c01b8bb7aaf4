"""Variable-composition search (``chemical_system``): the EMT hull of Cu-Au found by a run and checked
against the hull of the textbook orderings relaxed directly, kill and resume, outputs, operators, the
spreading rule, the running hull, and bad input."""

from __future__ import annotations

import csv
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers import globopt_process, write_config
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Lattice, Structure

from globopt.cli import main
from globopt.config import ConfigError, parse_config
from globopt.geometry import geometry_problem
from globopt.hull.settings import space_from_config
from globopt.hull.tracker import HullTracker
from globopt.search.composition_operators import add_atom, remove_atom, transmutation, variable_heredity
from globopt.search.composition_sampling import CompositionChooser
from globopt.search.factory import make_search

TESTS = Path(__file__).resolve().parent
# Energies of the run (fmax 0.05) and of the reference relaxations (fmax 0.01) of one minimum differ by far
# less than this (eV/atom); EMT formation energies in Cu-Au are about -0.01 eV/atom.
FOUND = 5e-4
CUAU = {
    "mode": "ga", "chemical_system": ["Cu", "Au"], "atoms": [1, 8], "seed": 2, "potential": {"kind": "emt"},
}  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def lowest_by_composition(rows: list[dict[str, str]]) -> dict[str, float]:
    lowest: dict[str, float] = {}
    for row in rows:
        energy = float(row["enthalpy_per_atom"])
        lowest[row["composition"]] = min(energy, lowest.get(row["composition"], np.inf))
    return lowest


# -- the reference: the elements and the L1_0 / L1_2 orderings relaxed directly with EMT ---------------------
def _relaxed(structure: Structure) -> float:
    from globopt.scoreboard.reference import relax_known

    return relax_known(structure, structure.formula, {"kind": "emt", "model": ""}, 0.01, 1000).energy_per_atom


@pytest.fixture(scope="module")
def reference() -> PhaseDiagram:
    a = 3.8
    fcc = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    structures = {
        "Cu": Structure(Lattice.cubic(3.6), ["Cu"] * 4, fcc),
        "Au": Structure(Lattice.cubic(4.08), ["Au"] * 4, fcc),
        "CuAu (L1_0)": Structure(
            Lattice.tetragonal(a / 2**0.5, a), ["Cu", "Au"], [[0, 0, 0], [0.5, 0.5, 0.5]]
        ),
        "Cu3Au (L1_2)": Structure(Lattice.cubic(a), ["Au", "Cu", "Cu", "Cu"], fcc),
        "CuAu3 (L1_2)": Structure(Lattice.cubic(a), ["Cu", "Au", "Au", "Au"], fcc),
    }
    entries = []
    for name, structure in structures.items():
        energy = _relaxed(structure)
        entries.append(PDEntry(structure.composition, energy * len(structure), name=name))
    return PhaseDiagram(entries)


def test_reference_hull_is_the_textbook_one_under_emt(reference: PhaseDiagram) -> None:
    stable = {e.name for e in reference.stable_entries}
    assert stable == {"Cu", "Au", "CuAu (L1_0)", "Cu3Au (L1_2)"}  # EMT puts CuAu3 above the hull
    above = {e.name: reference.get_e_above_hull(e) for e in reference.all_entries}
    assert above["CuAu3 (L1_2)"] > 0.005


# -- a whole run: GA over Cu-Au, up to 8 atoms per cell ------------------------------------------------------
@pytest.fixture(scope="module")
def cuau_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hull")
    config = write_config(folder, name="cuau_hull", budget={"evaluations": 120}, **CUAU)
    assert main(["run", str(config), "--out", str(folder / "run")]) == 0
    return folder / "run"


def test_run_finds_the_emt_hull_of_cu_au(cuau_run: Path, reference: PhaseDiagram) -> None:
    rows = read_csv(cuau_run / "hull.csv")
    lowest = lowest_by_composition(rows)
    # every phase of the reference is matched or beaten at its composition ...
    for entry in reference.all_entries:
        composition = entry.composition.reduced_formula
        assert lowest[composition] <= entry.energy_per_atom + FOUND, (entry.name, lowest[composition])
    # ... so the run's hull lies at or below the reference hull, and both reference compounds are on it
    run_hull = PhaseDiagram(
        [PDEntry(Composition(c), e * Composition(c).num_atoms) for c, e in lowest.items()]
    )
    for entry in reference.all_entries:
        assert run_hull.get_hull_energy_per_atom(entry.composition) <= (
            reference.get_hull_energy_per_atom(entry.composition) + FOUND
        )
    stable = {r["composition"] for r in rows if r["stable"] == "1"}
    assert {"Cu", "Au", "CuAu", "Cu3Au"} <= stable and "CuAu3" not in stable
    # hull.csv agrees with the hull it implies, and stable/ holds the stable and near-hull structures
    for row in rows:
        composition = Composition(row["composition"])
        above = float(row["enthalpy_per_atom"]) - run_hull.get_hull_energy_per_atom(composition)
        assert float(row["e_above_hull"]) == pytest.approx(max(above, 0.0), abs=3e-6)
    cifs = {p.name.rsplit("_id", 1)[-1] for p in (cuau_run / "stable").glob("*.cif")}
    assert {f"{r['id']}.cif" for r in rows if r["stable"] == "1"} <= cifs
    assert (cuau_run / "hull.png").stat().st_size > 1000
    assert not (cuau_run / "best").exists()  # stable/ replaces best/ across compositions


def test_run_spreads_over_compositions_and_changes_them(cuau_run: Path) -> None:
    db = sqlite3.connect(cuau_run / "archive.sqlite")
    rows = db.execute("SELECT origin, formula, parents FROM candidates ORDER BY id").fetchall()
    db.close()
    origins = [o for o, _, _ in rows]
    assert origins[:2] == ["reference:Cu", "reference:Au"]
    compositions = {Composition(f).reduced_formula for _, f, _ in rows}
    assert len(compositions) == 23  # every composition of 1-8 atoms of Cu-Au was tried
    operators = {o.split(":")[1] for o in origins if o.startswith("ga:") and not o.startswith("ga:init")}
    assert {"heredity", "transmutation"} <= operators


def test_status_and_report_show_the_hull(cuau_run: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["status", str(cuau_run)]) == 0
    status = capsys.readouterr().out
    assert "stable phases (" in status and "CuAu " in status and "Cu3Au " in status
    before = read_csv(cuau_run / "hull.csv")
    (cuau_run / "hull.csv").unlink()
    assert main(["report", str(cuau_run)]) == 0
    assert read_csv(cuau_run / "hull.csv") == before
    summary = (cuau_run / "report" / "summary.md").read_text()
    assert "## Convex hull" in summary and "hull.png" in summary


# -- kill and resume: the same hull as an uninterrupted run --------------------------------------------------
def _killing_config(folder: Path, name: str) -> Path:
    return write_config(
        folder, name=name, mode="ga", chemical_system=["Cu", "Au"], atoms=[1, 6], seed=5,
        potential={"kind": "ase", "calculator": "hull_calculators:KillingEMT"}, budget={"evaluations": 28},
        ga={"population_size": 8},
    )  # fmt: skip


def _hull_rows(run: Path) -> list[tuple]:
    return [
        (r["composition"], r["enthalpy_per_atom"], r["id"], r["stable"]) for r in read_csv(run / "hull.csv")
    ]


def test_killed_and_resumed_run_ends_with_the_same_hull(tmp_path: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    straight = tmp_path / "straight"
    process = globopt_process("run", str(_killing_config(tmp_path, "straight")), "--out", str(straight),
                              cwd=tmp_path, env=env)  # fmt: skip
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    split = tmp_path / "split"
    # the calculator kills the process at its 1000th potential call: in the middle of a relaxation
    process = globopt_process("run", str(_killing_config(tmp_path, "split")), "--out", str(split),
                              cwd=tmp_path, env={**env, "GLOBOPT_TEST_KILL_AT": "1000"})  # fmt: skip
    output, _ = process.communicate(timeout=600)
    assert process.returncode == -9, output
    db = sqlite3.connect(split / "archive.sqlite")
    done = db.execute("SELECT COUNT(*) FROM candidates WHERE status='relaxed'").fetchone()[0]
    pending = db.execute("SELECT COUNT(*) FROM candidates WHERE status='pending'").fetchone()[0]
    db.close()
    assert 5 < done < 25 and pending == 1
    process = globopt_process("resume", str(split), cwd=tmp_path, env=env)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert _hull_rows(split) == _hull_rows(straight)

    def sequence(run: Path) -> list[tuple]:
        return [(r["origin"], r["formula"], r["energy_per_atom"]) for r in read_csv(run / "results.csv")]

    assert sequence(split) == sequence(straight)


# -- the parts -----------------------------------------------------------------------------------------------
def _space(**hull):
    config = parse_config({"name": "s", **CUAU, "atoms": [1, 8], **({"hull": hull} if hull else {})})
    return config, space_from_config(config)


def test_operators_keep_children_in_the_space() -> None:
    _, space = _space(element_counts={"Au": [0, 4]})
    rng = np.random.default_rng(0)
    fcc = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    cu4 = Structure(Lattice.cubic(3.6), ["Cu"] * 4, fcc)
    cu3au = Structure(Lattice.cubic(3.75), ["Cu", "Cu", "Cu", "Au"], fcc)
    au2 = Structure(Lattice.tetragonal(2.9, 4.1), ["Au", "Au"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    made: dict[str, set[tuple[int, str]]] = {}
    for _ in range(20):
        for name, child in [
            ("heredity", variable_heredity(cu4, au2, space, rng)),
            ("transmutation", transmutation(cu3au, space, rng)),
            ("add_atom", add_atom(cu3au, space, rng)),
            ("remove_atom", remove_atom(cu3au, space, rng)),
        ]:
            if child is None:
                continue
            counts = space.counts_of(child)
            assert space.allows(counts), (name, counts)
            assert not geometry_problem(child, space.limits_for_counts(counts)), name
            made.setdefault(name, set()).add((len(child), child.composition.reduced_formula))
    # heredity of Cu4 and Au2: sizes between the parents', compositions in between
    assert all(2 <= n <= 4 for n, _ in made["heredity"])
    assert any(len(Composition(f).elements) == 2 for _, f in made["heredity"])
    # transmutation moves one atom A -> B, addition and removal change the size by one
    # (in the parent's cell, or in a doubled cell of it: Cu6Au2 -> Cu5Au3 / Cu7Au)
    assert made["transmutation"] <= {(4, "CuAu"), (4, "Cu"), (8, "Cu5Au3"), (8, "Cu7Au")}
    assert (4, "CuAu") in made["transmutation"]
    # on fcc Cu's 4-atom conventional cell, one swap makes L1_2 Cu3Au
    cu = Structure(Lattice.cubic(3.6), ["Cu"] * 4, fcc).get_primitive_structure()
    children = [transmutation(cu, space, rng) for _ in range(30)]
    l12 = Structure(Lattice.cubic(3.75), ["Au", "Cu", "Cu", "Cu"], fcc)
    assert any(c is not None and StructureMatcher().fit(c, l12) for c in children)
    assert made["add_atom"] <= {(5, "Cu4Au"), (5, "Cu3Au2")} and made["add_atom"]
    assert made["remove_atom"] <= {(3, "Cu2Au"), (3, "Cu")} and made["remove_atom"]


def test_spreading_rule_covers_then_weighs_by_visits_and_hull_distance() -> None:
    _, space = _space()
    tracker = HullTracker(["Cu", "Au"])
    chooser = CompositionChooser(space, tracker, temperature=0.1)
    rng = np.random.default_rng(0)
    # coverage first: while a composition is untried, the draw is among the untried ones
    seen = []
    for _ in range(len(space.compositions)):
        formula = space.formula(chooser.choose(rng))
        assert formula not in seen
        seen.append(formula)
        chooser.visit(formula)
    assert sorted(seen) == sorted(space.compositions)
    # then 1 / (1 + visits) times exp(-distance / T)
    tracker.add("Cu", -0.007, 1)
    tracker.add("Au", 0.0, 2)
    tracker.add("CuAu", -0.011, 3)
    tracker.add("Cu3Au", 0.1, 4)  # far above the hull
    chooser.visit("CuAu")
    weights = dict(zip(space.compositions, chooser.weights(), strict=True))
    n = {f: chooser.visits.get(f, 0) for f in space.compositions}
    ratio = weights["CuAu"] / weights["Cu2Au"]
    assert ratio == pytest.approx((1 + n["Cu2Au"]) / (1 + n["CuAu"]))
    distance = tracker.distance("Cu3Au")
    assert distance > 0.09
    assert weights["Cu3Au"] / weights["Cu2Au"] == pytest.approx(np.exp(-distance / 0.1))


def test_running_hull_changes_only_below_it_and_round_trips() -> None:
    tracker = HullTracker(["Cu", "Au"])
    tracker.add("Cu", -0.007, 1)
    assert not tracker.complete
    assert tracker.above_hull("CuAu", 0.0) is None  # no hull without both end points
    assert tracker.add("Au", 0.0, 2) and tracker.complete
    assert tracker.add("CuAu", -0.010, 3)  # below the line between the elements
    version = tracker.version
    assert not tracker.add("Cu3Au", 0.001, 4)  # above the hull: recorded, hull unchanged
    assert tracker.version == version and tracker.minima["Cu3Au"] == (0.001, 4)
    # the hull at Cu3Au runs from Cu (-0.007) to CuAu (-0.010): -0.0085 halfway
    assert tracker.above_hull("Cu3Au", 0.001) == pytest.approx(0.001 + 0.0085)
    assert [f for f, _, _ in tracker.stable()] == ["Cu", "CuAu", "Au"]
    copy = HullTracker(["Cu", "Au"])
    copy.load_state_dict(tracker.state_dict())
    assert copy.stable() == tracker.stable() and copy.hull_energy("Cu3Au") == tracker.hull_energy("Cu3Au")


def test_random_mode_and_the_search_state_round_trip() -> None:
    config = parse_config({"name": "r", **CUAU, "mode": "random"})
    search = make_search(config)
    proposals = [search.propose() for _ in range(6)]
    assert [p.origin for p in proposals[:2]] == ["reference:Cu", "reference:Au"]
    state = search.state_dict()
    twin = make_search(config)
    twin.load_state_dict(state)
    assert [twin.propose().structure for _ in range(3)] == [search.propose().structure for _ in range(3)]


# -- bad input: each a config error naming its key (exit code 2) ---------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"chemical_system": ["Cu", "Fe"]}, "chemical_system: element(s) Fe not covered by the potential"),
        ({"chemical_system": ["Cu", "Xx"]}, "'chemical_system': 'Xx': not a chemical element symbol"),
        ({"chemical_system": ["Cu"]}, "a chemical system needs at least two elements"),
        ({"atoms": [0, 4]}, "'atoms': expected n or [low, high] with 1 <= low <= high"),
        ({"atoms": [6, 2]}, "'atoms': expected n or [low, high] with 1 <= low <= high"),
        ({"atoms": None}, "atoms: required with chemical_system"),
        ({"hull": {"element_counts": {"Cu": [5, 8]}}, "atoms": [1, 4]}, "atoms: no cell content of 1-4"),
        ({"hull": {"element_counts": {"Ag": [0, 2]}}}, "hull.element_counts: Ag not in chemical_system"),
        ({"hull": {"compositions": ["CuAg"]}}, "hull.compositions: CuAg has element(s) Ag outside"),
        ({"hull": {"compositions": ["Cu5Au4"]}}, "hull.compositions: Cu5Au4 has no cell of 1-8 atoms"),
        ({"hull": {"compositions": []}}, "hull.compositions: empty list"),
        ({"composition": "CuAu"}, "chemical_system: searches every composition of the system; remove"),
        ({"mode": "pso"}, "chemical_system: mode pso cannot search a chemical system"),
        ({"hull": {"elemental_references": False, "element_counts": {"Cu": [1, 8], "Au": [1, 8]}}},
         "hull.elemental_references: false leaves no end point for Cu, Au"),
    ],
)  # fmt: skip
def test_bad_input_names_the_key(change: dict, message: str) -> None:
    data = {"name": "bad", **CUAU, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert message in str(error.value)


def test_bad_input_exits_with_code_2(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path, name="bad", **{**CUAU, "composition": "CuAu"})
    assert main(["validate", str(config)]) == 2
    assert "chemical_system" in capsys.readouterr().err
    plain = write_config(tmp_path, name="plain", composition="CuAu", potential={"kind": "emt"},
                         ga={"operators": {"heredity": 1, "transmutation": 1}}, atoms=4)  # fmt: skip
    assert main(["validate", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "atoms: only used with chemical_system" in err


# -- the run's other settings: process pool, MPI, surrogate -----------------------------------------------
def _small(folder: Path, name: str, **extra) -> Path:
    fields = {**CUAU, "atoms": [1, 4], "budget": {"evaluations": 16}, "ga": {"population_size": 6}, **extra}
    return write_config(folder, name=name, **fields)


def _stable(run: Path) -> set[str]:
    return {r["composition"] for r in read_csv(run / "hull.csv") if r["stable"] == "1"}


def test_process_pool_run_writes_the_hull(tmp_path: Path) -> None:
    assert main(["run", str(_small(tmp_path, "pool", workers=2)), "--out", str(tmp_path / "run")]) == 0
    assert {"Cu", "Au"} <= _stable(tmp_path / "run")
    rows = read_csv(tmp_path / "run" / "results.csv")
    workers = {r["worker"].rpartition(":")[2] for r in rows if r["worker"]}
    assert workers and str(os.getpid()) not in workers  # relaxed in the pool's processes


def test_surrogate_learns_formation_enthalpies_and_ranks_by_hull_distance(tmp_path: Path) -> None:
    from surrogates.acquisition import FormationReferences

    references = FormationReferences(["Cu", "Au"])
    references.observe("Cu3Au", -0.01)  # a compound teaches no elemental energy
    references.observe("Cu", -0.007)
    assert not references.complete
    references.observe("Au", 0.0)
    references.observe("Cu", -0.5)  # the first relaxed structure of an element stays its reference
    assert references.shift("CuAu") == pytest.approx(-0.0035)
    config = _small(tmp_path, "sur", surrogate={"enabled": True, "min_points": 4, "candidates_per_slot": 3})
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    db = sqlite3.connect(tmp_path / "run" / "archive.sqlite")
    statuses = {s for (s,) in db.execute("SELECT status FROM candidates")}
    db.close()
    assert "skipped" in statuses  # the GP ranked proposals once it had learned enough
    assert {"Cu", "Au"} <= _stable(tmp_path / "run")


@pytest.mark.mpi
def test_mpi_run_builds_random_structures_on_workers(tmp_path: Path) -> None:
    from test_mpi import _finish, _mpi_globopt

    config = _small(tmp_path, "mpi", budget={"evaluations": 20})
    out = tmp_path / "run"
    process = _mpi_globopt(3, "run", str(config), "--out", str(out), cwd=tmp_path)
    output = _finish(process, timeout=300)
    assert process.returncode == 0, output
    built = re.search(r"prepared ahead on rank 0 (\d+), on workers (\d+)", output)
    assert built and int(built.group(2)) > 0, output
    assert {"Cu", "Au"} <= _stable(out)
    assert len(read_csv(out / "hull.csv")) >= 4


def test_generator_seeds_the_compositions_it_covers() -> None:
    """The shipped Perov-5 diffusion model (cells of up to 5 atoms; Cu and Au among its elements) seeds the
    compounds of up to 5 atoms; sampling itself is tested in test_generators.py."""
    seeded = {"generator": "diffusion_perov5.pt", "fraction": 0.5, "sampling_steps": 50}
    config = parse_config({"name": "g", **CUAU, "atoms": [1, 8], "initial_population": seeded,
                           "ga": {"population_size": 4, "initial_random": 4}})  # fmt: skip
    search = make_search(config)
    contents = search.seeder.contents
    assert contents and all(sum(c.values()) <= 5 and len(c) == 2 for c in contents)
    assert len(contents) == sum(1 for c in search.space.contents if 2 <= sum(c) <= 5 and min(c) > 0)
    assert search.seeder.wanted == 2
    starts = [search.propose().origin for _ in range(2)]
    assert starts == ["reference:Cu", "reference:Au"]  # the references come before any seed
