"""The steady-state GA through the engine, with EMT: operators used, niching, determinism, resume."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers import PATIENCE, Gate, committed, emt_config, globopt_process, read_results, sigkill_at_gate

from globopt.cli import main
from globopt.config import parse_config
from globopt.search.factory import make_search

GA = {"population_size": 6, "initial_random": 6}


def search_state(run_dir: Path) -> dict:
    db = sqlite3.connect(run_dir / "archive.sqlite")
    try:
        return json.loads(db.execute("SELECT value FROM search_state").fetchone()[0])
    finally:
        db.close()


@pytest.fixture(scope="module")
def ga_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ga")
    config = emt_config(folder, name="ga", evaluations=20, mode="ga", ga=GA)
    assert main(["run", str(config), "--out", str(folder / "run")]) == 0
    return folder / "run"


def test_ga_breeds_after_the_initial_population(ga_run: Path) -> None:
    rows = [r for r in read_results(ga_run) if r["status"] not in ("rejected", "duplicate")]
    origins = [r["origin"] for r in rows]
    n_init = sum(o.startswith("ga:init:sg") for o in origins)
    assert 2 <= n_init <= GA["initial_random"]  # initial proposals rejected as duplicates are not evaluated
    assert all(o.startswith("ga:init:sg") for o in origins[:n_init]), (
        "breeding starts after the initial population"
    )
    bred = {o.split(":")[1] for o in origins[n_init:]}
    assert len(bred) >= 2, f"several operators should have produced children, got {bred}"
    children = [r for r in rows[n_init:] if r["parents"] not in ("", "[]")]
    assert children and all(json.loads(r["parents"]) for r in children)


def test_population_is_unique_best_of_archive(ga_run: Path) -> None:
    state = search_state(ga_run)
    population = state["population"]
    assert 2 <= len(population) <= GA["population_size"]
    energies = [m["scores"][0] for m in population]
    ids = [m["id"] for m in population]
    assert len(set(ids)) == len(ids)
    rows = {int(r["id"]): r for r in read_results(ga_run)}
    assert all(rows[i]["status"] == "relaxed" for i in ids)
    # niching: no two members are the same minimum
    assert all(rows[i]["duplicate_of"] == "" for i in ids)
    # the best relaxed structure found is in the population and in the hall of fame
    best = min(float(r["enthalpy_per_atom"]) for r in rows.values() if r["status"] == "relaxed")
    assert min(energies) == pytest.approx(best, abs=1e-6)
    assert state["hall_of_fame"][0]["enthalpy_per_atom"] == pytest.approx(best, abs=1e-6)
    assert state["logbook"], "DEAP statistics are recorded"


def run_ga(folder: Path, evaluations: int, out: Path, *flags: str) -> int:
    config = emt_config(folder, name="ga", evaluations=evaluations, mode="ga", ga=GA)
    return main(["run", str(config), "--out", str(out), *flags])


def test_interrupted_then_resumed_ga_continues_the_same_search(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert run_ga(tmp_path, 14, straight) == 0
    split = tmp_path / "split"
    assert run_ga(tmp_path, 8, split) == 0
    assert run_ga(tmp_path, 14, split, "--resume") == 0

    def sequence(run: Path) -> list[tuple[str, str, str]]:
        return [(r["origin"], r["status"], r["energy_per_atom"]) for r in read_results(run)]

    assert sequence(split) == sequence(straight)


def test_sigkill_mid_run_resumes_from_the_checkpointed_population(tmp_path: Path) -> None:
    config = emt_config(tmp_path, name="ga", evaluations=24, gated=True, mode="ga", ga=GA)
    out = tmp_path / "run"
    before = sigkill_at_gate(
        "run",
        str(config),
        "--out",
        str(out),
        out=out,
        cwd=tmp_path,
        count=10,
        gate=Gate(tmp_path / "gate", out),
    )
    assert len(before) == 10
    population_before = [m["id"] for m in search_state(out)["population"]]
    assert population_before
    resumed = globopt_process("resume", str(out), cwd=tmp_path)
    output, _ = resumed.communicate(timeout=PATIENCE)
    assert resumed.returncode == 0, output
    after = committed(out)
    assert len(after) == 24 and {k: after[k] for k in before} == before
    origins = [r["origin"] for r in read_results(out)]
    assert sum(o.startswith("ga:init") for o in origins) == GA["initial_random"], "the GA did not start over"


def test_multi_objective_ga_writes_a_pareto_front(tmp_path: Path) -> None:
    objectives = [{"name": "density", "property": "density", "target": 14.0}]
    config = emt_config(tmp_path, name="mo", evaluations=12, mode="ga", ga=GA, objectives=objectives)
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out)]) == 0
    rows = [r for r in read_results(out) if r["status"] == "relaxed"]
    assert all(json.loads(r["objectives"])["density"] > 0 for r in rows)
    front = [r for r in rows if r["pareto_front"] == "1"]
    assert front
    lowest = min(rows, key=lambda r: float(r["enthalpy_per_atom"]))
    unique_lowest = lowest["duplicate_of"] == ""
    assert not unique_lowest or lowest["pareto_front"] == "1", (
        "the lowest-enthalpy structure is always on the front"
    )


def test_variable_formula_units_compare_energy_per_atom() -> None:
    config = parse_config(
        {
            "name": "fu",
            "mode": "ga",
            "composition": "CuAu",
            "formula_units": [1, 3],
            "potential": {"kind": "emt"},
        }
    )
    assert config.cell_contents == [{"Cu": 1, "Au": 1}, {"Cu": 2, "Au": 2}, {"Cu": 3, "Au": 3}]
    search = make_search(config)
    sizes = {len(search.propose().structure) for _ in range(12)}
    assert sizes == {2, 4, 6}


def test_operator_probabilities_follow_the_children_that_pay_off() -> None:
    config = parse_config(
        {"name": "adapt", "mode": "ga", "composition": "Cu2Au2", "potential": {"kind": "emt"}}
    )
    search = make_search(config)
    base = search.operator_probabilities().copy()
    names = list(search._operator_names)
    assert np.allclose(base, search._operator_p)  # nothing judged yet: the configured probabilities
    search.operator_stats = {
        "heredity": {"proposed": 40, "judged": 40, "entered": 20, "new_best": 4},
        "lattice_strain": {"proposed": 40, "judged": 40, "entered": 0, "new_best": 0},
    }
    adapted = search.operator_probabilities()
    heredity, strain = names.index("heredity"), names.index("lattice_strain")
    assert adapted.sum() == pytest.approx(1.0)
    assert adapted[heredity] > base[heredity] and adapted[strain] < base[strain]
    assert np.all(adapted >= 0.3 * base - 1e-12)  # the floor: no operator is switched off
    fixed = parse_config(
        {**config.model_dump(), "ga": {**config.ga.model_dump(), "adaptive_operators": False}}
    )
    search = make_search(fixed)
    search.operator_stats = {"heredity": {"proposed": 40, "judged": 40, "entered": 20, "new_best": 4}}
    assert np.allclose(search.operator_probabilities(), base)


def _cu2au2_ga(name: str, **ga):
    """A Cu2Au2 GA on EMT (config, search), ``ga`` overriding its GA settings."""
    raw = {"name": name, "mode": "ga", "composition": "Cu2Au2", "potential": {"kind": "emt"}}
    config = parse_config({**raw, "ga": ga} if ga else raw)
    return config, make_search(config)


def _relaxed(candidate_id: int, energy: float, **fields):
    """A relaxed outcome in an ordered Cu2Au2 cell, as a worker would report it."""
    from pymatgen.core import Lattice, Structure

    from globopt.candidate import Evaluation, Status

    cell = Structure(
        Lattice.cubic(3.8), ["Cu", "Cu", "Au", "Au"], [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    )
    return Evaluation(candidate_id, Status.RELAXED, relaxed=cell, enthalpy_per_atom=energy, **fields)


def test_a_member_whose_minimum_children_keep_refinding_loses_parent_tournaments() -> None:
    from globopt.search.ga import EXHAUSTED_AFTER

    config, search = _cu2au2_ga("mined")
    for candidate_id, energy in ((1, -0.02), (2, -0.01)):
        search.tell(candidate_id, _relaxed(candidate_id, energy, spacegroup_number=100 + candidate_id))
    best = next(m for m in search.population if m.candidate_id == 1)
    before = [m.candidate_id for _ in range(200) for m in search._select(1)]
    assert before.count(1) > 0.8 * len(before)  # the best wins every tournament it enters (7 in 8)
    for child in range(10, 10 + EXHAUSTED_AFTER):  # children that relax back into the best's minimum
        search.tell(child, _relaxed(child, -0.019, spacegroup_number=101, duplicate_of=1))
    assert best.refound == EXHAUSTED_AFTER and best.exhausted
    after = [m.candidate_id for _ in range(200) for m in search._select(1)]
    assert after.count(2) > 0.8 * len(after)  # now the fresh member wins every tournament it enters
    state = search.state_dict()
    restored = make_search(config)
    restored.load_state_dict(state)
    assert {m.candidate_id: m.refound for m in restored.population} == {1: EXHAUSTED_AFTER, 2: 0}


def test_the_statistics_record_in_the_search_state_stays_bounded() -> None:
    """The state is written with every proposal: its population statistics keep the latest records only."""
    from globopt.search.ga import LOGBOOK_KEPT

    _, search = _cu2au2_ga("log", population_size=2)
    results = 2 * (LOGBOOK_KEPT + 10)
    for candidate_id in range(1, results + 1):
        search.tell(candidate_id, _relaxed(candidate_id, -0.01))
    state = search.state_dict()
    assert len(state["logbook"]) == LOGBOOK_KEPT
    assert state["logbook"][-1]["evaluations"] == results  # the latest are the ones kept


def test_the_state_text_reuses_the_population_encoding_and_equals_plain_json() -> None:
    import json

    from globopt.state_json import SEPARATORS, encode_state

    _, search = _cu2au2_ga("enc")
    texts = []
    for candidate_id, energy, same_as in ((1, -0.02, None), (2, -0.01, None), (3, -0.019, 1)):
        result = _relaxed(candidate_id, energy, spacegroup_number=100 + candidate_id, duplicate_of=same_as)
        search.tell(candidate_id, result)
        state = search.state_dict()
        texts.append(encode_state(state))
        assert texts[-1] == json.dumps(state, separators=SEPARATORS)
        assert search.state_dict()["population"] is state["population"]  # nothing changed: not encoded again
    assert json.loads(texts[-1])["population"][0]["refound"] == 1  # a member's history changed: re-encoded
    # DEAP's random state and the statistics record: encoded again only when they change
    before = search.state_dict()
    assert search.state_dict()["py_random"] is before["py_random"]
    search._select(1)  # a tournament draws from DEAP's random numbers
    after = search.state_dict()
    assert after["py_random"] is not before["py_random"] and after["py_random"] != before["py_random"]
    assert after["logbook"] is before["logbook"]
    for candidate_id in range(4, 4 + search.ga.population_size):
        search.tell(candidate_id, _relaxed(candidate_id, -0.001 * candidate_id))
    grown = search.state_dict()
    assert len(grown["logbook"]) == len(before["logbook"]) + 1
    assert encode_state(grown) == json.dumps(grown, separators=SEPARATORS)
    restored = _cu2au2_ga("enc")[1]
    restored.load_state_dict(json.loads(encode_state(grown)))
    assert encode_state(restored.state_dict()) == encode_state(grown)
