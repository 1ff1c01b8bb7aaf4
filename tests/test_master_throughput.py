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
)
from globopt.geometry import geometry_limits, geometry_problem
from globopt.search.random_search import RandomSymmetricSearch
from globopt.search.random_stream import RandomStream, build_for_screening
from globopt.structure_codec import structure_from_json
from tests.helpers import emt_config

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
        built_on_workers = int(log.split("on workers ")[-1].split()[0])
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
