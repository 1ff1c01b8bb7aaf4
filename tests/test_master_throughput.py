"""Work moved off rank 0: random structures built on workers, screening data computed there, cheaper
duplicate checks, screened rows committed with the next durable write. Each must change only where the
CPU time goes, never what the search does; these tests check that."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from globopt.archive import Archive
from globopt.candidate import Evaluation, Proposal, Status
from globopt.cli import main
from globopt.duplicates import (
    DuplicateIndex,
    bucket_key,
    cell_lengths,
    lattice_minima,
    reduced_for_matching,
    structure_fingerprint,
)
from globopt.evaluator.evaluate import spacegroup_of
from globopt.geometry import geometry_limits, geometry_problem
from globopt.search.random_search import RandomSymmetricSearch
from globopt.search.random_stream import RandomStream, build_for_screening
from globopt.structure_codec import structure_from_json
from tests.helpers import emt_config, write_config

CONTENT = {"Cu": 2, "Au": 2}
LIMITS = geometry_limits(CONTENT, CONTENT.values(), 0.7, (0.6, 3.0))


def _stream(**kwargs) -> RandomStream:
    return RandomStream("random", 5, [CONTENT], None, 1.1, attempts=50, **kwargs)


def test_structure_k_is_the_same_wherever_and_in_whatever_order_it_is_built() -> None:
    reference = _stream()
    inline = [reference.next().structure for _ in range(6)]
    stream = _stream()
    recipes = stream.requests(count=6, lookahead=6)
    assert [r.index for r in recipes] == list(range(6))
    assert stream.requests(count=6, lookahead=6) == []  # all being built: nothing asked twice
    built = build_for_screening(reversed(recipes), LIMITS, symprec=0.1)  # a worker, backwards
    stream.deliver(built[:3])
    stream.lost([item.recipe for item in built[3:]])  # its worker died: indices 2..0 are built here
    consumed = [stream.next().structure for _ in range(6)]
    assert consumed == inline
    assert stream.built_elsewhere == 3 and stream.built_here == 3


def test_worker_screening_data_equals_what_rank_0_would_compute() -> None:
    stream = _stream()
    for item in build_for_screening(stream.requests(8, 8), LIMITS, symprec=0.1):
        structure, screening = item.structure, item.screening
        assert screening.geometry_problem == geometry_problem(structure, LIMITS)
        if not screening.geometry_problem:
            assert screening.key == bucket_key(structure, 0.1)
            assert StructureMatcher().fit(screening.reduced, reduced_for_matching(structure))
            assert screening.reduced.lattice == reduced_for_matching(structure).lattice
            assert np.allclose(screening.minima, lattice_minima(screening.reduced))
            assert np.array_equal(screening.fingerprint, structure_fingerprint(screening.reduced))


def test_random_search_resumes_at_the_same_structure_after_prebuilt_ones_are_lost() -> None:
    search = RandomSymmetricSearch([CONTENT], seed=3)
    first = [search.propose().structure for _ in range(3)]
    search.deliver_generated(build_for_screening(search.generation_requests(4, 4), LIMITS, 0.1))
    state = json.loads(json.dumps(search.state_dict()))
    expected = [search.propose().structure for _ in range(4)]
    resumed = RandomSymmetricSearch([CONTENT], seed=3)
    resumed.load_state_dict(state)
    assert [resumed.propose().structure for _ in range(4)] == expected
    assert first != expected[:3]


def _strained_copy(structure: Structure, rng: np.random.Generator, size: float) -> Structure:
    strain = np.eye(3) + rng.normal(0, size, (3, 3))
    copy = Structure(Lattice(structure.lattice.matrix @ strain), structure.species, structure.frac_coords)
    copy.perturb(size, min_distance=0.0)
    return copy


def test_lattice_minima_prefilter_never_hides_a_match() -> None:
    """Strained and rattled copies, from barely to far beyond the tolerances: every pair StructureMatcher
    matches must also pass the prefilter (the prefilter may only remove pairs that cannot match)."""
    rng = np.random.default_rng(0)
    matcher = StructureMatcher(ltol=0.2, stol=0.3, angle_tol=5, primitive_cell=True, scale=True)
    bound = 1.2 * 1.01
    stream = _stream()
    matched = pruned = 0
    for _ in range(8):
        original = reduced_for_matching(stream.next().structure)
        for size in (0.01, 0.05, 0.1, 0.2, 0.4):
            copy = reduced_for_matching(_strained_copy(original, rng, size))
            if len(copy) != len(original):
                continue
            for query, indexed in ((copy, original), (original, copy)):
                passes = bool(np.all(lattice_minima(query) < bound * cell_lengths(indexed)))
                fits = matcher.fit(query, indexed, skip_structure_reduction=True)
                assert passes or not fits
                matched += fits
                pruned += not passes
    assert matched >= 16 and pruned >= 4  # both sides of the boundary were exercised


def test_duplicate_index_still_finds_a_strained_copy() -> None:
    index = DuplicateIndex(0.2, 0.3, 5, 0.05, 0.1)
    structure = _stream().next().structure
    index.add(1, structure)
    copy = _strained_copy(structure, np.random.default_rng(1), 0.01)
    assert index.find(copy, key=index.key(structure)) == 1


def test_fingerprint_ignores_the_choice_of_cell_origin_and_site_order() -> None:
    structure = _stream().next().structure
    reference = structure_fingerprint(structure)
    shifted = structure.copy()
    shifted.translate_sites(list(range(len(shifted))), [0.31, 0.17, 0.58])
    shuffled = Structure.from_sites([shifted[i] for i in np.random.default_rng(0).permutation(len(shifted))])
    for other in (
        reduced_for_matching(structure),
        shuffled,
        structure.copy().scale_lattice(2 * structure.volume),
    ):
        assert np.allclose(structure_fingerprint(other), reference)
    assert not np.allclose(structure_fingerprint(_stream().next().structure), reference[::-1])


def _one_bucket(count: int) -> list[Structure]:
    """Rattled copies of one cell: the lattice conditions pass between all of them, the sites differ."""
    base = reduced_for_matching(_stream().next().structure)
    rng = np.random.default_rng(7)
    copies = []
    for _ in range(count):
        copy = base.copy()
        copy.perturb(0.9, min_distance=0.4)
        copies.append(
            Structure(copy.lattice, copy.species, copy.frac_coords + rng.normal(0, 0.02, (len(copy), 3)))
        )
    return copies


@pytest.mark.parametrize("limit", [None, 3])
def test_bounded_duplicate_query_compares_the_fingerprint_nearest_and_still_finds_the_copy(limit) -> None:
    """Past max_comparisons, StructureMatcher runs only on the fingerprint-nearest entries: a slightly
    strained copy of an indexed structure is still found, with at most that many comparisons."""
    structures = _one_bucket(30)
    index = DuplicateIndex(0.2, 0.3, 5, 0.05, 0.1, max_comparisons=limit)
    key = ("Au2Cu2", 1)
    for candidate_id, structure in enumerate(structures, start=1):
        index.add(candidate_id, structure, key=key)
    target = 17
    copy = _strained_copy(structures[target - 1], np.random.default_rng(3), 0.005)
    fits_before = index.fits
    found = index.find(copy, key=key)
    assert found is not None
    assert StructureMatcher().fit(copy, structures[found - 1])
    if limit is not None:
        assert found == target
        assert index.fits - fits_before <= limit and index.bounded_queries == 1
    else:
        assert index.bounded_queries == 0


def test_duplicate_index_lists_the_lowest_minima_lowest_first() -> None:
    index = DuplicateIndex(0.2, 0.3, 5, 0.05, 0.1)
    stream = _stream()
    energies = [-3.0, -5.0, None, -4.0, -5.0, -1.0]  # None: unrelaxed, never a minimum; -5.0 twice: by id
    for candidate_id, energy in enumerate(energies, start=1):
        index.add(candidate_id, stream.next().structure, energy=energy)
    assert [(i, e) for i, e, _ in index.lowest(3)] == [(2, -5.0), (5, -5.0), (4, -4.0)]
    assert len(index.lowest(10)) == 5


def test_screened_rows_are_committed_with_the_next_durable_write(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive.sqlite")
    structure = _stream().next().structure
    screened = archive.add_candidate(Proposal(structure, "test"), Status.DUPLICATE, {"n": 1}, "same")
    other = sqlite3.connect(tmp_path / "archive.sqlite")
    assert other.execute("SELECT COUNT(*) FROM candidates").fetchone()[0] == 0  # a kill now loses both
    pending = archive.add_candidate(Proposal(structure, "test"), Status.PENDING, {"n": 2})
    assert [r[0] for r in other.execute("SELECT id FROM candidates ORDER BY id")] == [screened, pending]
    assert json.loads(other.execute("SELECT value FROM search_state").fetchone()[0]) == {"n": 2}
    archive.add_candidate(Proposal(structure, "test"), Status.REJECTED, {"n": 3}, "too close")
    archive.close()  # closing commits the trailing screened row
    assert other.execute("SELECT COUNT(*) FROM candidates").fetchone()[0] == 3


@pytest.mark.slow
def test_random_search_proposes_the_same_structures_with_a_process_pool(tmp_path: Path) -> None:
    """workers: 2 builds most random structures in the pool; the proposals, in id order, must be the ones
    a serial run makes (what each one was screened as may differ: results arrive in another order)."""
    initial = {}
    for workers in (1, 2):
        out = tmp_path / f"run{workers}"
        config = emt_config(tmp_path, name=f"w{workers}", evaluations=8, workers=workers)
        assert main(["run", str(config), "--out", str(out)]) == 0
        db = sqlite3.connect(out / "archive.sqlite")
        rows = db.execute("SELECT initial FROM candidates ORDER BY id").fetchall()
        initial[workers] = [structure_from_json(r[0]) for r in rows]
        log = (out / "globopt.log").read_text()
        built_on_workers = int(log.split("on workers ")[-1].split()[0].rstrip(";"))
        assert (built_on_workers > 0) == (workers == 2), log[-2000:]
    shared = min(len(initial[1]), len(initial[2]))
    assert shared >= 8
    assert initial[1][:shared] == initial[2][:shared]


def test_only_results_wait_for_the_disk(tmp_path: Path) -> None:
    """Proposals commit without an fsync (a kill cannot lose them; a power loss loses them only together
    with the search state after them); a relaxation's result commit fsyncs, and with it all before it."""
    archive = Archive(tmp_path / "archive.sqlite")
    structure = _stream().next().structure

    def synchronous() -> int:
        return archive.db.execute("PRAGMA synchronous").fetchone()[0]

    pending = archive.add_candidate(Proposal(structure, "test"), Status.PENDING, {"n": 1})
    assert synchronous() == 1  # NORMAL
    archive.commit_evaluation(Evaluation(pending, Status.FAILED, "boom"), {"n": 2})
    assert synchronous() == 2  # FULL
    archive.close()


@pytest.mark.slow
def test_duplicates_found_by_pool_workers_match_rank_0_screening(tmp_path: Path) -> None:
    """With workers in other processes, rank 0 defers a proposal's duplicate comparisons to its worker. A
    random search's proposals do not depend on results, so the serial run (rank 0 compares) and the pool run
    (workers compare) must propose the same structures and find the same ones duplicates of earlier
    proposals; the pool run's duplicates cost no potential call and leave the budget for relaxations.
    Relaxations stop after two steps, so a relaxed structure is its own starting cell (or the cell is one
    its forces cannot move): whether a minimum has arrived when a proposal is handed out cannot decide a
    verdict, the earlier proposal decides it, in both runs alike."""
    statuses = {}
    for workers in (1, 2):
        out = tmp_path / f"run{workers}"
        config = write_config(
            tmp_path, name=f"cuau{workers}", composition="Cu1Au1", seed=4, mode="random",
            budget={"evaluations": 10}, potential={"kind": "emt"}, workers=workers,
            relax={"max_steps": 2, "fmax": 1e-6},
        )  # fmt: skip
        assert main(["run", str(config), "--out", str(out)]) == 0
        db = sqlite3.connect(out / "archive.sqlite")
        rows = db.execute("SELECT id, status, n_force_calls, worker FROM candidates ORDER BY id").fetchall()
        statuses[workers] = [r[1] for r in rows]
        duplicates = [r for r in rows if r[1] == "duplicate"]
        assert duplicates, "2-atom cells repeat: the test needs duplicates"
        assert not any(r[2] for r in duplicates)
        assert sum(r[1] not in ("duplicate", "rejected") for r in rows) == 10
        if workers == 2:
            log = (out / "globopt.log").read_text()
            assert any(r[3] for r in duplicates), "no duplicate was found by a worker"
            assert "0 queries limited" in log
    shared = min(len(statuses[1]), len(statuses[2]))
    is_duplicate = {w: [s == "duplicate" for s in statuses[w][:shared]] for w in statuses}
    assert is_duplicate[1] == is_duplicate[2]


def test_comparisons_of_a_reissued_task_see_only_earlier_proposals_and_removed_ones_never() -> None:
    """A pending task handed out again after a resume is compared with the proposals indexed before it
    (not with later ones, which were compared with it); a proposal its worker found to be a duplicate is
    removed from the index, as a resume's rebuild would leave it out."""
    structures = _one_bucket(6)
    index = DuplicateIndex(0.2, 0.3, 5, 0.05, 0.1)
    key = ("Au2Cu2", 1)
    for candidate_id, structure in enumerate(structures, start=1):
        index.add(candidate_id, structure, key=key)
    query = structures[3]
    earlier = [e.candidate_id for e in index.comparisons(query, key=key, before=4)]
    assert earlier and all(i < 4 for i in earlier)
    everything = {e.candidate_id for e in index.comparisons(query, key=key)}
    assert set(earlier) < everything
    index.remove(2)
    assert 2 not in {e.candidate_id for e in index.comparisons(query, key=key)}
    assert len(index) == 5
    cell = index.comparisons(query, key=key)[0].cell
    assert StructureMatcher().fit(cell.structure(), structures[cell.candidate_id - 1])


def test_a_pending_duplicate_handed_out_again_after_a_kill_is_still_compared(tmp_path: Path) -> None:
    """Killed between handing a proposal out and hearing its worker's verdict: the archive holds it as
    pending. The resumed run's index (rebuilt from the archive) gives it the cells of the proposals before
    it, not its own or later ones, and its worker then finds it a duplicate without relaxing it."""
    from globopt.evaluator.evaluate import EvaluatorSettings, evaluate_task
    from globopt.evaluator.relax import RelaxSettings
    from globopt.screening import ProposalScreen

    first = _stream().next().structure
    copy = _strained_copy(first, np.random.default_rng(2), 0.005)
    other = _stream().next().structure
    archive = Archive(tmp_path / "archive.sqlite")
    ids = [archive.add_candidate(Proposal(s, "test"), Status.PENDING, {}) for s in (first, copy, other)]
    search = RandomSymmetricSearch([CONTENT], seed=3)
    screen = ProposalScreen(search, 0.2, 0.3, 5.0, 0.01, 0.1, max_comparisons=32)
    screen.rebuild(archive)
    pending = {task.candidate_id: task for task in archive.pending_tasks()}
    archive.close()
    assert screen.comparisons_for(ids[0], first) == ()
    cells = screen.comparisons_for(ids[1], pending[ids[1]].structure)
    assert [cell.candidate_id for cell in cells] == [ids[0]]
    task = pending[ids[1]]
    task.compare_with = cells
    settings = EvaluatorSettings({"kind": "emt"}, RelaxSettings(fmax=0.05, max_steps=20))
    verdict = evaluate_task(task, settings)
    assert (
        verdict.status is Status.DUPLICATE and verdict.duplicate_of == ids[0] and verdict.n_force_calls == 0
    )
    screen.forget_proposal(ids[1])
    assert ids[1] not in {cell.candidate_id for cell in screen.comparisons_for(ids[2] + 1, copy)}


def _bred_ga(seed: int = 4, operators: dict[str, float] | None = None):
    """A Cu2Au2 GA past its first generation: four distinct members (random cells told as relaxed)."""
    from globopt.config import parse_config
    from globopt.search.factory import make_search

    ga = {"population_size": 4} if operators is None else {"population_size": 4, "operators": operators}
    config = parse_config(
        {"name": "ahead", "mode": "ga", "composition": "Cu2Au2", "seed": seed, "potential": {"kind": "emt"},
         "ga": ga}
    )  # fmt: skip
    search = make_search(config)
    stream = _stream()
    cells = [stream.next().structure for _ in range(4)]
    for candidate_id, cell in enumerate(cells, start=1):
        search.proposed(candidate_id)
        energy = -0.01 * candidate_id
        relaxed = Evaluation(
            candidate_id,
            Status.RELAXED,
            relaxed=cell,
            enthalpy_per_atom=energy,
            spacegroup_number=candidate_id if operators is None else spacegroup_of(cell, 0.1)[1],
        )
        search.tell(candidate_id, relaxed)
    search.initial_proposed = search.initial_target
    return search


WYCKOFF_OPERATORS = {"wyckoff_heredity": 0.4, "wyckoff_mutation": 0.4, "immigrant": 0.2}


@pytest.mark.parametrize("operators", [None, WYCKOFF_OPERATORS], ids=["default", "wyckoff"])
def test_a_planned_child_is_the_same_wherever_it_is_built_and_survives_a_resume(operators) -> None:
    """Children planned for workers: built from pickled recipes there or on rank 0 when none arrived,
    the proposals are the same; a checkpoint keeps the plans."""
    import pickle

    here, there = _bred_ga(operators=operators), _bred_ga(operators=operators)
    recipes_here = here.generation_requests(8, 16)
    recipes_there = there.generation_requests(8, 16)
    children = [r for r in recipes_there if type(r).__name__ == "ChildRecipe"]
    # random structures (immigrants) need no search state: asked for ahead of the plans, beside children
    assert type(recipes_there[0]).__name__ == "RandomRecipe"
    # a Wyckoff heredity plan without a group-mate for its first parent is a failed try, not a recipe
    assert len(children) >= (4 if operators is None else 1)
    assert [r.number for r in children] == sorted(r.number for r in children)
    # nothing is asked twice (with the default operators every plan is being built already)
    asked_again = {r.number for r in there.children.requests(8)}
    assert not asked_again & {r.number for r in children}
    assert operators is not None or not asked_again
    shipped = pickle.loads(pickle.dumps(tuple(recipes_there)))  # what a worker receives
    there.deliver_generated(build_for_screening(shipped, there.limits, symprec=0.1))  # the run's limits
    state = json.loads(json.dumps(there.state_dict()))
    assert len(state["children"]["planned"]) == len(there.children.planned) > 0
    resumed = _bred_ga(operators=operators)
    resumed.load_state_dict(state)
    assert len(recipes_here) == len(recipes_there)
    proposals = {name: [s.propose() for _ in range(6)] for name, s in
                 (("here", here), ("there", there), ("resumed", resumed))}  # fmt: skip
    structures = {name: [p.structure for p in made] for name, made in proposals.items()}
    assert structures["here"] == structures["there"] == structures["resumed"]
    assert [p.origin for p in proposals["here"]] == [p.origin for p in proposals["there"]]
    assert any(p.origin.startswith("ga:") and p.parents for p in proposals["there"])
    if operators is not None:
        return  # Wyckoff children: fewer are shipped (see above), so the counts below do not apply
    bred = [p for p in proposals["there"] if p.parents]
    assert all(p.screening is not None for p in bred)  # prepared where it was built
    assert there.children.built_elsewhere == len(bred) and here.children.built_elsewhere == 0
    assert resumed.children.built_here == len(bred)


@pytest.mark.slow
def test_ga_children_are_built_by_pool_workers(tmp_path: Path) -> None:
    """workers: 2: once breeding starts, children come from the workers, screened and relaxed as usual."""
    out = tmp_path / "run"
    config = emt_config(tmp_path, name="gaw", evaluations=24, workers=2, mode="ga", ga={"population_size": 6})
    assert main(["run", str(config), "--out", str(out)]) == 0
    db = sqlite3.connect(out / "archive.sqlite")
    origins = [r[0] for r in db.execute("SELECT origin FROM candidates WHERE origin NOT LIKE 'ga:init%'")]
    assert len(origins) >= 10, origins
    log = (out / "globopt.log").read_text()
    built_on_workers = int(log.split("on workers ")[-1].split()[0].rstrip(";"))
    initial = len(db.execute("SELECT id FROM candidates WHERE origin LIKE 'ga:init%'").fetchall())
    assert built_on_workers > initial, log[-2000:]  # more than the first generation: children too
