"""Benchmark harness: suite files, references, hit detection, and a whole benchmark through the CLI."""

from __future__ import annotations

import json
import sqlite3
import statistics
from pathlib import Path

import pytest
import yaml
from pymatgen.core import Lattice, Structure

from globopt.cli import main
from globopt.config import ConfigError
from globopt.scoreboard.hits import EvaluatedStructure, first_hit, origin_class
from globopt.scoreboard.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
STANDARD = REPO / "benchmarks" / "suites" / "standard.yaml"
HARD = REPO / "benchmarks" / "suites" / "hard.yaml"

# Cell contents of the bundled suite from the textbook prototypes: the primitive cell unless an entry
# asks for the conventional one.
EXPECTED_CELLS = {
    "NaCl": {"Na": 1, "Cl": 1},
    "NaCl8": {"Na": 4, "Cl": 4},  # conventional cell
    "CaF2": {"Ca": 1, "F": 2},
    "ZnS": {"Zn": 1, "S": 1},
    "GaN": {"Ga": 2, "N": 2},
    "ZnO": {"Zn": 2, "O": 2},
    "TiO2": {"Ti": 2, "O": 4},
    "SrTiO3": {"Sr": 1, "Ti": 1, "O": 3},
    "LiCoO2": {"Li": 1, "Co": 1, "O": 2},
    "Al2O3": {"Al": 4, "O": 6},
    "MgAl2O4": {"Mg": 2, "Al": 4, "O": 8},
}
EXPECTED_GROUPS = {
    "NaCl": 225, "NaCl8": 225, "CaF2": 225, "ZnS": 216, "GaN": 186, "ZnO": 186, "TiO2": 136, "SrTiO3": 221,
    "LiCoO2": 166, "Al2O3": 167, "MgAl2O4": 227,
}  # fmt: skip


def test_bundled_suite_builds_the_known_prototypes() -> None:
    suite = load_suite(STANDARD)
    assert {e.name: e.composition for e in suite.entries} == EXPECTED_CELLS
    for entry in suite.entries:
        assert entry.structure.get_space_group_info(symprec=0.01)[1] == EXPECTED_GROUPS[entry.name], (
            entry.name
        )
        distances = entry.structure.distance_matrix + 10 * (entry.structure.distance_matrix == 0)
        assert distances.min() > 1.7, f"{entry.name}: atoms too close, wrong Wyckoff setting?"
    anatase = suite.select(["TiO2"])[0].polymorphs["anatase"]
    assert anatase.get_space_group_info(symprec=0.01)[1] == 141 and len(anatase) == 6


# The hard suite: searched cell (atoms), space group of the given structure, and its listed polymorphs
# with their space groups.
HARD_ENTRIES = {
    "Al2O3": (10, 167, {}), "MgTiO3": (10, 148, {}), "SrTiO3-10": (10, 221, {}),
    "Ga2O3": (10, 12, {"corundum": 167}), "CaCO3": (10, 167, {}),
    "TiO2-12": (12, 141, {"rutile": 136, "columbite": 60}),
    "ZrO2": (12, 14, {"tetragonal": 137, "cubic": 225}), "FeS2": (12, 205, {"marcasite": 58}),
    "Cu2O-12": (12, 224, {}), "Li2O-12": (12, 225, {}), "CaF2-12": (12, 225, {}), "LiCoO2-12": (12, 166, {}),
    "MgAl2O4": (14, 227, {}), "Si3N4": (14, 176, {}), "GaN-16": (16, 186, {"zinc blende": 216}),
    "ZnO-16": (16, 186, {"zinc blende": 216}), "SiO2-18": (18, 154, {}),
    "CaTiO3": (20, 62, {"cubic": 221}), "Mg2SiO4": (28, 62, {"ringwoodite": 227}),
}  # fmt: skip


def test_hard_suite_builds_every_entry_with_its_space_group_and_size() -> None:
    suite = load_suite(HARD)
    assert suite.spec.name == "hard" and suite.spec.budget == 300 and suite.spec.seeds == [0, 1, 2, 3, 4]
    assert suite.spec.modes == ["random", "ga", "pso", "ase-ga"]
    assert suite.spec.search == {}, "the hard suite measures the product's default search settings"
    assert [e.name for e in suite.entries] == list(HARD_ENTRIES)
    for entry in suite.entries:
        atoms, group, polymorphs = HARD_ENTRIES[entry.name]
        assert len(entry.structure) == atoms, entry.name
        assert entry.structure.get_space_group_info(symprec=0.01)[1] == group, entry.name
        distances = entry.structure.distance_matrix + 10 * (entry.structure.distance_matrix == 0)
        assert distances.min() > 1.2, f"{entry.name}: atoms too close, wrong Wyckoff setting?"
        assert {k: p.get_space_group_info(symprec=0.01)[1] for k, p in entry.polymorphs.items()} == polymorphs
        units = entry.structure.composition.get_reduced_composition_and_factor()[1]
        for name, polymorph in entry.polymorphs.items():
            needed = polymorph.get_primitive_structure().composition.get_reduced_composition_and_factor()[1]
            assert units % needed == 0, f"{entry.name}: polymorph {name} does not fit the searched cell"
    # quartz is typed with Si at z = 0.6666667: its symmetry copies on the cell faces are one atom each
    quartz = suite.select(["SiO2-18"])[0].structure
    assert quartz.composition.as_dict() == {"Si": 6, "O": 12}


@pytest.mark.parametrize(
    ("supercell", "expected"), [(2, {"Na": 2, "Cl": 2}), ([2, 2, 1], {"Na": 4, "Cl": 4})]
)
def test_supercell_multiplies_the_searched_content(tmp_path: Path, supercell, expected) -> None:
    entry = load_suite(_suite(tmp_path, entry_supercell=supercell)).entries[0]
    assert entry.composition == expected
    assert entry.structure.get_space_group_info(symprec=0.01)[1] == 225


def _suite(tmp_path: Path, **changes) -> Path:
    data = {
        "name": "bad",
        "structures": [
            {"name": "NaCl", "spacegroup": "Fm-3m", "lattice": {"a": 5.69}, "species": ["Na", "Cl"],
             "coords": [[0, 0, 0], [0.5, 0.5, 0.5]]}
        ],
    }  # fmt: skip
    for key, value in changes.items():
        if key.startswith("entry_"):
            data["structures"][0][key.removeprefix("entry_")] = value
        else:
            data[key] = value
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"modes": ["ga", "annealing"]}, "unknown ['annealing']"),
        ({"entry_coords": [[0, 0, 0]]}, "2 species but 1 coords"),
        ({"entry_lattice": {"b": 3.0}}, "lattice needs a"),
        ({"entry_spacegroup": "Xyz"}, "cannot build the structure"),
        ({"entry_colour": "red"}, "colour"),
        ({"entry_cif": "missing.cif", "entry_spacegroup": None, "entry_lattice": None, "entry_species": None,
          "entry_coords": None}, "missing.cif does not exist"),
        ({"entry_polymorphs": [{"name": "wrong", "spacegroup": "Fm-3m", "lattice": {"a": 4.2},
          "species": ["Mg", "O"], "coords": [[0, 0, 0], [0.5, 0.5, 0.5]]}]}, "polymorph wrong: composition"),
        # wurtzite NaCl has 2 formula units per primitive cell: the 1-unit rock-salt cell cannot hold it
        ({"entry_polymorphs": [{"name": "wurtzite", "spacegroup": "P6_3mc", "lattice": {"a": 4.3, "c": 7.0},
          "species": ["Na", "Cl"], "coords": [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.38]]}]},
         "polymorph wurtzite: its primitive cell has 2 formula units, which do not divide the 1"),
        ({"entry_coords": [[0, 0, 0], [0, 0, 1e-9]]}, "Na and Cl sit on the same spot"),
    ],
)  # fmt: skip
def test_bad_suites_are_named(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_suite(_suite(tmp_path, **changes))
    assert message in str(error.value)
    assert str(tmp_path / "suite.yaml") in str(error.value)


def test_unknown_structure_and_missing_suite_are_cli_errors(tmp_path: Path, capsys) -> None:
    tiny = REPO / "benchmarks" / "suites" / "tiny.yaml"
    assert main(["benchmark", str(tiny), "--structures", "Unobtainium", "--out", str(tmp_path)]) == 2
    assert "no structure named Unobtainium" in capsys.readouterr().err
    assert main(["benchmark", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_hit_by_structure_or_by_energy() -> None:
    rock_salt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.69), ["Na", "Cl"], [[0] * 3, [0.5] * 3])
    caesium_chloride = Structure(Lattice.cubic(3.4), ["Na", "Cl"], [[0] * 3, [0.5] * 3])
    shifted_supercell = rock_salt.get_primitive_structure() * (1, 1, 2)
    shifted_supercell.translate_sites(list(range(len(shifted_supercell))), [0.1, 0.2, 0.3])
    reference_energy = -3.3675
    evaluations = [
        # a failed relaxation still uses up the budget, and its force calls count
        EvaluatedStructure(None, None, 10.0, force_calls=40, origin="ga:init:sg221"),
        EvaluatedStructure(caesium_chloride, -3.30, 11.0, force_calls=25, origin="ga:init:sg225"),
        # same structure, a looser relaxation
        EvaluatedStructure(shifted_supercell, -3.3600, 12.0, force_calls=31, origin="ga:heredity"),
        EvaluatedStructure(rock_salt, -3.3675, 13.0, force_calls=7, origin="ga:soft"),
    ]
    hit = first_hit(evaluations, rock_salt, reference_energy, 0.001, started_at=9.0)
    assert hit is not None and (hit.evaluations, hit.seconds) == (3, 3.0)
    assert (hit.force_calls, hit.origin) == (40 + 25 + 31, "ga:heredity")
    # one relaxation without a force-call record (an older ase-ga record) makes the sum unknown, not smaller
    evaluations[1].force_calls = None
    assert first_hit(evaluations, rock_salt, reference_energy, 0.001, 9.0).force_calls is None
    # a structure that does not match but is as low as the reference (a degenerate polymorph) also counts
    lower = [EvaluatedStructure(caesium_chloride, reference_energy + 0.0005, 10.0)]
    assert first_hit(lower, rock_salt, reference_energy, 0.001, started_at=9.0).evaluations == 1
    assert first_hit(evaluations[:2], rock_salt, reference_energy, 0.001, started_at=9.0) is None
    # a copy at 1.8x the volume is not the relaxed minimum: the matcher does not rescale volumes
    strained = rock_salt.copy()
    strained.scale_lattice(rock_salt.volume * 1.8)
    assert (
        first_hit([EvaluatedStructure(strained, -3.2, 1.0)], rock_salt, reference_energy, 0.001, 0.0) is None
    )


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("ga:init:sg12", "init"), ("pso:init:sg225", "init"), ("ase-ga:start", "init"),
        ("ga:immigrant:sg62", "immigrant"), ("pso:immigrant:sg2", "immigrant"),
        ("pso:regen:sg14", "pso-regen"),
        ("ga:heredity", "heredity"), ("ase-ga:pairing", "heredity"),
        ("ga:lattice_strain", "lattice_strain"), ("ase-ga:strain", "lattice_strain"),
        ("ga:permutation", "permutation"), ("ase-ga:permutation", "permutation"),
        ("ga:coordinate", "coordinate"), ("ga:soft", "soft"), ("ase-ga:soft", "soft"),
        ("pso:move:p3", "pso-move"), ("random:sg166", "random"), ("generator:diffusion", "generator"),
        ("ga:twinning", "ga:twinning"), ("", "unknown"), (None, "unknown"),
    ],
)  # fmt: skip
def test_origins_fall_into_operator_classes(origin: str | None, expected: str) -> None:
    """The labels the searches write into the archive (and ase-ga's operators) map onto shared classes; an
    operator the mapping does not know keeps its own label rather than inflating another class."""
    assert origin_class(origin) == expected


def test_wurtzite_does_not_match_its_layered_hexagonal_neighbour() -> None:
    """Wurtzite ZnO vs the layered h-BN-like P6_3/mmc minimum (u = 0.5, a = 3.51, c = 4.51 Å under M3GNet,
    ~50 meV/atom higher): pymatgen's default tolerances match them in a 4-atom cell; the hit matcher must not.
    """

    def hexagonal(u: float, a: float, c: float) -> Structure:
        return Structure.from_spacegroup(
            "P6_3mc", Lattice.hexagonal(a, c), ["Zn", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, u]]
        )

    wurtzite = hexagonal(0.382, 3.297, 5.299)
    layered = hexagonal(0.5, 3.508, 4.512)
    from pymatgen.analysis.structure_matcher import StructureMatcher

    assert StructureMatcher(scale=False).fit(layered, wurtzite), "the false positive this guards against"
    assert first_hit([EvaluatedStructure(layered, -4.49, 1.0)], wurtzite, -4.5438, 0.001, 0.0) is None
    looser = hexagonal(0.380, 3.30, 5.31)  # the same minimum relaxed to fmax 0.05
    assert first_hit([EvaluatedStructure(looser, -4.52, 1.0)], wurtzite, -4.5438, 0.001, 0.0) is not None


EMT_SUITE = {
    "name": "emt",
    "budget": 3,
    "seeds": [0],
    "modes": ["random", "ga", "pso"],
    "potential": {"kind": "emt"},
    "search": {"ga": {"population_size": 2}, "pso": {"swarm_size": 2}},
    "structures": [
        {"name": "Cu3Au", "prototype": "L1_2", "spacegroup": "Pm-3m", "lattice": {"a": 3.75},
         "species": ["Au", "Cu"], "coords": [[0, 0, 0], [0, 0.5, 0.5]]},
    ],
}  # fmt: skip


def test_benchmark_runs_every_mode_through_the_engine(tmp_path: Path, capsys) -> None:
    """Mechanics with EMT (physics is not the point here): references, run directories, JSON, table, reuse."""
    suite = tmp_path / "emt.yaml"
    suite.write_text(yaml.safe_dump(EMT_SUITE))
    modes = ["random", "ga", "pso"]
    try:
        import ase_ga  # noqa: F401

        modes.append("ase-ga")
    except ImportError:
        print("ase-ga not installed (pip install -e '.[baselines]'): the baseline is left out of this test")
    out = tmp_path / "out"
    assert main(["benchmark", str(suite), "--modes", *modes, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    document = json.loads((out / "benchmark.json").read_text())
    assert [r["mode"] for r in document["runs"]] == modes
    # a search ends at its first energy hit (default) or at the budget
    assert all(r["evaluations"] in (3, r["evaluations_to_hit"]) for r in document["runs"])
    assert document["stopped_at_first_hit"] is True
    reference = document["references"]["Cu3Au"]
    assert reference["spacegroup"] == "Pm-3m" and reference["source"] == "given"
    for run in document["runs"]:
        assert run["best_energy_per_atom"] >= reference["energy_per_atom"] - 0.05
        assert run["hit"] == (run["evaluations_to_hit"] is not None)
        assert Path(run["run_dir"]).is_dir()
    for mode in ("random", "ga", "pso"):
        assert main(["status", str(out / "runs" / f"Cu3Au-{mode}-s0")]) == 0
    # every search is an ordinary run directory: `globopt report` gives plots and the best-structure table
    assert main(["report", str(out / "runs" / "Cu3Au-ga-s0")]) == 0
    report = (out / "runs" / "Cu3Au-ga-s0" / "report" / "summary.md").read_text()
    assert "## Best unique structures" in report and "| 1 |" in report and "Cu3Au (4 atoms)" in report
    assert "## Where the evaluations came from" in report and "| ga:init |" in report
    assert (out / "runs" / "Cu3Au-ga-s0" / "report" / "convergence.png").stat().st_size > 10_000
    table = (out / "benchmark.md").read_text()
    assert "| Cu3Au (4) |" in table and "**overall** (budget 3)" in table and table.split("\n|")[0] in printed
    assert [row["mode"] for row in document["summary"]["overall"]] == modes

    # the same command again reuses the finished searches and the reference: identical results
    assert main(["benchmark", str(suite), "--modes", *modes, "--out", str(out)]) == 0
    again = json.loads((out / "benchmark.json").read_text())
    keys = ("entry", "mode", "seed", "hit", "evaluations_to_hit", "best_energy_per_atom")
    assert [{k: r[k] for k in keys} for r in again["runs"]] == [
        {k: r[k] for k in keys} for r in document["runs"]
    ]

    # --full-budget spends every evaluation; --set reaches every search's run config
    full = tmp_path / "full"
    command = ["benchmark", str(suite), "--modes", "random", "--out", str(full), "--full-budget"]
    assert main([*command, "--set", "relax.rattle=0.0", "--set", "relax.fmax=0.04"]) == 0
    document = json.loads((full / "benchmark.json").read_text())
    assert [r["evaluations"] for r in document["runs"]] == [3]
    assert document["stopped_at_first_hit"] is False
    stored = yaml.safe_load((full / "runs" / "Cu3Au-random-s0" / "config.yaml").read_text())
    assert stored["relax"]["rattle"] == 0.0 and stored["relax"]["fmax"] == 0.04
    assert stored["budget"]["target_enthalpy_per_atom"] is None
    assert main([*command, "--set", "relax.rattle"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main([*command, "--set", "relax.no_such_key=1", "--out", str(tmp_path / "bad")]) == 2
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.m3gnet
def test_reference_is_the_lowest_known_polymorph(models_dir: Path) -> None:
    """TiO2 is listed as rutile, but M3GNet-MP-2021.2.8 puts anatase lower: anatase becomes the reference."""
    from globopt.scoreboard.reference import reference_for

    entry = load_suite(STANDARD).select(["TiO2"])[0]
    reference = reference_for(entry, {"kind": "matgl", "model": "M3GNet-MP-2021.2.8-PES"})
    energies = {r.label: r.energy_per_atom for r in reference.considered}
    assert energies["given"] == pytest.approx(-8.9427, abs=2e-3)
    assert energies["anatase"] == pytest.approx(-8.9545, abs=2e-3)
    assert reference.best.label == "anatase" and reference.best.spacegroup == "I4_1/amd"


def _archive_evaluations(run_dir: Path) -> list[sqlite3.Row]:
    """A globopt run's relaxations as the archive holds them, in the order they finished (read directly)."""
    db = sqlite3.connect(run_dir / "archive.sqlite")
    db.row_factory = sqlite3.Row
    free = ("pending", "rejected", "duplicate", "skipped")  # statuses that cost no relaxation
    marks = ",".join("?" * len(free))
    rows = db.execute(
        f"SELECT * FROM candidates WHERE status NOT IN ({marks}) ORDER BY finished_at, id", free
    ).fetchall()
    db.close()
    return rows


def test_force_calls_and_hit_origins_are_those_of_the_run_records(tmp_path: Path) -> None:
    """Force calls to the first hit = the archive's n_force_calls summed up to the hit; the hit's origin is
    the archive's origin of that row (ase-ga: its operator); totals and medians add up; an ase-ga record
    written before these fields existed is read back (origins from its database) instead of failing."""
    pytest.importorskip("ase_ga")
    suite = tmp_path / "emt.yaml"
    suite.write_text(yaml.safe_dump({**EMT_SUITE, "budget": 8, "seeds": [1, 2]}))
    out = tmp_path / "out"
    command = ["benchmark", str(suite), "--modes", "random", "ga", "pso", "ase-ga", "--out", str(out)]
    # the whole budget, so a run's total is more than its cost to the first hit whenever it hit early
    assert main([*command, "--full-budget"]) == 0
    document = json.loads((out / "benchmark.json").read_text())
    runs = document["runs"]
    assert len(runs) == 8 and all(r["evaluations"] == 8 for r in runs)
    assert sum(r["hit"] for r in runs) >= 4, "too few hits for the test to mean anything"
    assert any(r["hit"] and r["evaluations_to_hit"] > 1 for r in runs if r["mode"] != "ase-ga")

    for run in runs:
        run_dir = Path(run["run_dir"])
        if run["mode"] == "ase-ga":
            stored = json.loads((run_dir / "evaluations.json").read_text())["evaluations"]
            calls = [e["force_calls"] for e in stored]
            origins = [e["origin"] for e in stored]
            assert origins[:2] == ["ase-ga:start"] * 2  # the start population (population_size 2)
            operators = {"ase-ga:pairing", "ase-ga:soft", "ase-ga:strain", "ase-ga:permutation"}
            assert set(origins[2:]) <= operators
        else:
            rows = _archive_evaluations(run_dir)
            calls = [r["n_force_calls"] for r in rows]
            origins = [r["origin"] for r in rows]
            assert origins[0].startswith(f"{run['mode']}:")
        assert len(calls) == run["evaluations"] and all(c > 0 for c in calls)
        assert run["force_calls_total"] == sum(calls)
        if run["hit"]:
            k = run["evaluations_to_hit"]
            assert run["force_calls_to_hit"] == sum(calls[:k])
            assert run["hit_origin"] == origins[k - 1]
            assert run["hit_origin_class"] == origin_class(origins[k - 1])
            if k < run["evaluations"]:
                assert run["force_calls_to_hit"] < run["force_calls_total"]
        else:
            assert run["force_calls_to_hit"] is None and run["hit_origin"] is None

    summary = document["summary"]
    for row in summary["per_entry"]:
        mine = [r for r in runs if r["mode"] == row["mode"]]
        to_hit = [r["force_calls_to_hit"] for r in mine if r["hit"]]
        assert row["median_force_calls_to_hit"] == (statistics.median(to_hit) if to_hit else None)
        assert row["total_force_calls"] == sum(r["force_calls_total"] for r in mine)
        assert row["runs_without_force_calls"] == 0
    overall = {row["mode"]: row for row in summary["overall"]}
    origins = summary["first_hit_origins"]
    for mode in ("random", "ga", "pso", "ase-ga"):
        mine = [r for r in runs if r["mode"] == mode]
        assert sum(origins[mode].values()) == sum(r["hit"] for r in mine)
        assert overall[mode]["total_force_calls"] == sum(r["force_calls_total"] for r in mine)
    assert set(origins["random"]) <= {"random"}
    table = (out / "benchmark.md").read_text()
    assert "## Where the first hits came from" in table
    ase_hits = [r for r in runs if r["mode"] == "ase-ga" and r["hit"]]
    assert f"| ase-ga | {len(ase_hits)} |" in table
    assert f"{overall['ase-ga']['total_force_calls']:,} fc" in table

    # an ase-ga record from before force calls and origins were stored: read back, not searched again
    for seed in (1, 2):
        record = out / "runs" / f"Cu3Au-ase-ga-s{seed}" / "evaluations.json"
        data = json.loads(record.read_text())
        for e in data["evaluations"]:
            del e["force_calls"], e["origin"], e["seconds"]
        record.write_text(json.dumps(data))
    assert main([*command, "--full-budget"]) == 0
    again = json.loads((out / "benchmark.json").read_text())
    before = {(r["mode"], r["seed"]): r for r in runs}
    for run in again["runs"]:
        old = before[(run["mode"], run["seed"])]
        assert (run["hit"], run["evaluations_to_hit"], run["hit_origin"]) == (
            old["hit"], old["evaluations_to_hit"], old["hit_origin"]
        )  # fmt: skip
        if run["mode"] == "ase-ga":
            assert run["force_calls_total"] is None and run["force_calls_to_hit"] is None
        else:
            assert run["force_calls_total"] == old["force_calls_total"]
    ase = next(row for row in again["summary"]["overall"] if row["mode"] == "ase-ga")
    assert ase["runs_without_force_calls"] == 2 and ase["total_force_calls"] == 0
    assert "0 fc (2 runs unrecorded)" in (out / "benchmark.md").read_text()

    # read with a smaller budget, a finished globopt run is scored on its first relaxations only
    shorter = ["benchmark", str(suite), "--modes", "random", "ga", "pso", "--out", str(out), "--budget", "3"]
    assert main([*shorter, "--full-budget"]) == 0
    for run in json.loads((out / "benchmark.json").read_text())["runs"]:
        old = before[(run["mode"], run["seed"])]
        calls = [r["n_force_calls"] for r in _archive_evaluations(Path(run["run_dir"]))]
        assert len(calls) == 8 and run["evaluations"] == 3 and run["force_calls_total"] == sum(calls[:3])
        assert run["hit"] == (old["hit"] and old["evaluations_to_hit"] <= 3)
