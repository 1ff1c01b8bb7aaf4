"""Operators on Wyckoff orbits: their children keep the parents' space group and formula."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
from pyxtal import pyxtal

from globopt.geometry import geometry_limits
from globopt.search.wyckoff_operators import symmetric_form, wyckoff_heredity, wyckoff_mutation

SPINEL_CONTENT = {"Mg": 2, "Al": 4, "O": 8}
# atoms of the conventional cell per primitive cell, for the pyxtal parents
CENTRING = {227: 4, 166: 3, 12: 2, 14: 1, 2: 1}


def limits_for(content: dict[str, int]):
    return geometry_limits(content, content.values(), 0.7, (0.5, 3.0))


def group_of(structure: Structure) -> int:
    return SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_number()


def pyxtal_parents(group: int, count: int) -> list[Structure]:
    """Random MgAl2O4 cells of 14 atoms in ``group`` (pyxtal counts atoms per conventional cell)."""
    factor = CENTRING[group]
    parents: list[Structure] = []
    for seed in range(200):
        crystal = pyxtal()
        try:
            crystal.from_random(
                3, group, ["Mg", "Al", "O"], [2 * factor, 4 * factor, 8 * factor], random_state=seed
            )
        except Exception:  # pyxtal gives up on some draws; the next seed is tried
            continue
        structure = crystal.to_pymatgen().get_primitive_structure()
        form = symmetric_form(structure)
        if len(structure) == 14 and form is not None and form.group == group:
            parents.append(structure)
        if len(parents) == count:
            return parents
    raise AssertionError(f"pyxtal made too few parents in group {group}")


def rutile(x: float, a: float, c: float) -> Structure:
    return Structure.from_spacegroup(
        "P4_2/mnm", Lattice.tetragonal(a, c), ["Ti", "O"], [[0, 0, 0], [x, x, 0]]
    )


@pytest.mark.parametrize("group", [227, 166, 12, 14, 2])
def test_children_keep_the_parents_space_group_and_formula(group: int) -> None:
    parents = pyxtal_parents(group, 4)
    limits, rng = limits_for(SPINEL_CONTENT), np.random.default_rng(group)
    children = [
        wyckoff_heredity(first, second, SPINEL_CONTENT, limits, rng)
        for first in parents
        for second in parents
        if first is not second
    ]
    made = [child for child in children if child is not None]
    assert len(made) >= 0.6 * len(children)  # measured: 85-97% at these settings
    for child in made:
        assert group_of(child) == group
        assert child.composition.get_el_amt_dict() == {el: float(n) for el, n in SPINEL_CONTENT.items()}
        assert not StructureMatcher().fit(child, parents[0]) or not StructureMatcher().fit(child, parents[1])


def test_a_child_takes_one_sublattice_from_each_parent() -> None:
    """Rutile has one Ti and one O orbit: the child is Ti of one parent on O of the other, on a lattice
    between theirs. Parents that are supercells of their primitive cell give a child of their size."""
    first, second = rutile(0.305, 4.59, 2.96) * (1, 1, 2), rutile(0.28, 4.70, 3.05) * (2, 1, 1)
    content = {"Ti": 4, "O": 8}
    child = wyckoff_heredity(first, second, content, limits_for(content), np.random.default_rng(0))
    assert child is not None and len(child) == 12
    assert SpacegroupAnalyzer(child, symprec=0.01).get_space_group_symbol() == "P4_2/mnm"
    refined = SpacegroupAnalyzer(child, symprec=0.01).get_refined_structure()
    oxygen_x = sorted(
        {round(float(site.frac_coords[0]) % 0.5, 3) for site in refined if site.specie.symbol == "O"}
    )
    assert any(abs(x - 0.305) < 2e-3 or abs(x - 0.28) < 2e-3 for x in oxygen_x + [0.5 - x for x in oxygen_x])
    a, c = refined.lattice.a, refined.lattice.c
    assert 4.59 < a < 4.70 and 2.96 < c < 3.05


def test_parents_of_different_groups_or_without_symmetry_give_no_child() -> None:
    limits, rng = limits_for(SPINEL_CONTENT), np.random.default_rng(1)
    cubic, monoclinic = pyxtal_parents(227, 1)[0], pyxtal_parents(12, 1)[0]
    assert wyckoff_heredity(cubic, monoclinic, SPINEL_CONTENT, limits, rng) is None
    triclinic = cubic.copy()
    triclinic.perturb(0.4, min_distance=0.3)
    assert symmetric_form(triclinic) is None
    assert wyckoff_heredity(triclinic, cubic, SPINEL_CONTENT, limits, rng) is None


def test_the_ga_pairs_wyckoff_parents_within_one_space_group() -> None:
    from test_ga import _relaxed

    from globopt.config import parse_config
    from globopt.search.factory import make_search
    from globopt.search.operators import VARIATION_OPERATORS

    raw = {"name": "pairs", "mode": "ga", "composition": "Cu2Au2", "potential": {"kind": "emt"}}
    search = make_search(parse_config(raw))
    groups = {1: 123, 2: 123, 3: 221, 4: 1, 5: 1}
    for candidate_id, group in groups.items():
        search.tell(candidate_id, _relaxed(candidate_id, -0.01 * candidate_id, spacegroup_number=group))
    operator = VARIATION_OPERATORS["wyckoff_heredity"]
    pairs = [tuple(m.candidate_id for m in search._parents_for(operator)) for _ in range(300)]
    for first, second in pairs:
        if first == second:  # no group-mate (221) or no symmetry (P1): a failed try for the GA
            assert groups[first] in (221, 1)
        else:
            assert groups[first] == groups[second] == 123
    assert {(1, 2), (2, 1)} <= set(pairs)


@pytest.mark.parametrize("group", [227, 166, 12, 2])
def test_mutated_children_keep_the_group_formula_cell_and_part_of_the_parent(group: int) -> None:
    limits, rng = limits_for(SPINEL_CONTENT), np.random.default_rng(group)
    tries = [
        (parent, wyckoff_mutation(parent, SPINEL_CONTENT, limits, rng))
        for parent in pyxtal_parents(group, 3)
        for _ in range(5)
    ]
    made = [(parent, child) for parent, child in tries if child is not None]
    assert len(made) >= 0.6 * len(tries)  # measured: 70-100% at these settings
    for parent, child in made:
        assert group_of(child) == group
        assert child.composition.get_el_amt_dict() == {el: float(n) for el, n in SPINEL_CONTENT.items()}
        before, after = symmetric_form(parent), symmetric_form(child)
        assert after is not None
        # the parent's cell shape (the overlap repair may have scaled it into the volume window)
        assert np.allclose(after.parameters[3:], before.parameters[3:], atol=1e-3)
        assert np.allclose(
            after.parameters[:3] / after.parameters[0], before.parameters[:3] / before.parameters[0]
        )
    # most children are new structures (a redraw can land on an equivalent one; the engine screens those)
    assert sum(not StructureMatcher().fit(parent, child) for parent, child in made) >= 0.7 * len(made)


def test_a_parent_without_symmetry_is_not_mutated() -> None:
    triclinic = pyxtal_parents(227, 1)[0].copy()
    triclinic.perturb(0.4, min_distance=0.3)
    limits = limits_for(SPINEL_CONTENT)
    assert wyckoff_mutation(triclinic, SPINEL_CONTENT, limits, np.random.default_rng(0)) is None
