"""Crystal variation operators: every child is valid by the engine's own rules and reproducible from the
generator state, because the GA master trusts both (it neither re-checks children nor stores them
before a checkpoint)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from ase.calculators.calculator import Calculator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymatgen.core import Lattice, Structure

from globopt.geometry import GeometryLimits, geometry_limits, geometry_problem
from globopt.search.cells import lattice_problem, make_valid, validity_problem
from globopt.search.operators import (
    OPERATORS,
    SOFT_REPAIR_SLACK,
    coordinate_mutation,
    heredity,
    lattice_strain,
    permutation,
    random_immigrant,
    soft_mutation,
    symmetric_mutation,
)
from globopt.search.pyxtal_sampling import compatible_spacegroups
from globopt.search.wyckoff_operators import wyckoff_heredity, wyckoff_mutation

CONTENTS = {
    "Na4Cl4": {"Na": 4, "Cl": 4},
    "Ti2O4": {"Ti": 2, "O": 4},
    "Mg4Si2O8": {"Mg": 4, "Si": 2, "O": 8},
    "Cu4": {"Cu": 4},
    "Ga2N2": {"Ga": 2, "N": 2},
    "Na8Cl8": {"Na": 8, "Cl": 8},
}
SAME_SIZE = ["Na4Cl4", "Ti2O4", "Mg4Si2O8", "Cu4", "Ga2N2"]
POOL_SIZE = 8
SEEDS = st.integers(0, 2**32 - 1)
INDICES = st.integers(0, POOL_SIZE - 1)
MUTATIONS = ("lattice_strain", "permutation", "coordinate", "soft")


def fast(examples: int) -> settings:
    # derandomize: the same examples on every run, so a failure reproduces and the suite cannot flake;
    # database=None: no .hypothesis folder in the checkout
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


@functools.cache
def limits_for(name: str) -> GeometryLimits:
    content = CONTENTS[name]
    return geometry_limits(content, content.values(), 0.6, (0.4, 8.0))


@functools.cache
def pool(name: str) -> tuple[Structure, ...]:
    """Random symmetric parents from pyxtal, built once per content (about 0.1 s each)."""
    rng = np.random.default_rng(2024)
    parents: list[Structure] = []
    while len(parents) < POOL_SIZE:
        made = random_immigrant(CONTENTS[name], limits_for(name), rng)
        if made is not None:
            parents.append(made[0])
    return tuple(parents)


def apply(operator: str, name: str, a: int, b: int, rng: np.random.Generator) -> Structure | None:
    """Run one operator the way the GA does, on parents a (and b) of the named pool."""
    content, limits, parents = CONTENTS[name], limits_for(name), pool(name)
    if operator == "heredity":
        return heredity(parents[a], parents[b], content, limits, rng)
    if operator == "lattice_strain":
        return lattice_strain(parents[a], limits, rng)
    if operator == "permutation":
        return permutation(parents[a], limits, rng)
    if operator == "coordinate":
        return coordinate_mutation(parents[a], limits, rng)
    if operator == "soft":
        return soft_mutation(parents[a], limits, rng)
    if operator == "symmetric":
        return symmetric_mutation(parents[a], limits, rng)
    if operator == "wyckoff_heredity":
        # the GA pairs parents of one space group: the partner is b's move of a within a's group
        partner = symmetric_mutation(parents[a], limits, np.random.default_rng(b)) or parents[b]
        return wyckoff_heredity(parents[a], partner, content, limits, rng)
    if operator == "wyckoff_mutation":
        return wyckoff_mutation(parents[a], content, limits, rng)
    assert operator == "immigrant", f"no test driver for operator {operator!r}"
    made = random_immigrant(content, limits, rng)
    return None if made is None else made[0]


def same_structure(first: Structure, second: Structure) -> bool:
    """Identical as stored (same basis, order and coordinates), i.e. a copy rather than a new child."""
    if len(first) != len(second) or [s.symbol for s in first.species] != [s.symbol for s in second.species]:
        return False
    diff = first.frac_coords - second.frac_coords
    diff -= np.round(diff)
    return np.allclose(first.lattice.matrix, second.lattice.matrix, atol=1e-8) and np.allclose(
        diff, 0.0, atol=1e-8
    )


def largest_move(before: Structure, after: Structure) -> float:
    diff = after.frac_coords - before.frac_coords
    diff -= np.round(diff)
    return float(np.linalg.norm(diff @ before.lattice.matrix, axis=1).max())


def assert_valid_child(child: Structure, name: str, *parents: Structure) -> None:
    assert validity_problem(child, CONTENTS[name], limits_for(name)) == ""
    assert geometry_problem(child, limits_for(name)) == ""
    assert not any(same_structure(child, parent) for parent in parents)


def rocksalt(a: float = 5.64) -> Structure:
    face_centres = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    coords = np.concatenate([face_centres, (face_centres + 0.5) % 1.0])
    return Structure(Lattice.cubic(a), ["Na"] * 4 + ["Cl"] * 4, coords)


# ----------------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("name", list(CONTENTS))
def test_pool_parents_are_valid(name: str) -> None:
    for parent in pool(name):
        assert validity_problem(parent, CONTENTS[name], limits_for(name)) == ""


@fast(90)
@given(
    name=st.sampled_from(SAME_SIZE),
    operator=st.sampled_from(["heredity", *MUTATIONS]),
    a=INDICES,
    b=INDICES,
    seed=SEEDS,
)
def test_every_child_is_valid_and_new(name: str, operator: str, a: int, b: int, seed: int) -> None:
    child = apply(operator, name, a, b, np.random.default_rng(seed))
    if child is not None:
        assert_valid_child(child, name, pool(name)[a], pool(name)[b])


@fast(5)
@given(name=st.sampled_from(SAME_SIZE), seed=SEEDS)
def test_immigrants_are_valid_and_in_a_compatible_group(name: str, seed: int) -> None:
    made = random_immigrant(CONTENTS[name], limits_for(name), np.random.default_rng(seed))
    assert made is not None
    structure, group = made
    assert_valid_child(structure, name)
    assert group in compatible_spacegroups(list(CONTENTS[name].values()))


@fast(30)
@given(a=INDICES, b=INDICES, seed=SEEDS, target=st.sampled_from(["Na4Cl4", "Na8Cl8"]), swap=st.booleans())
def test_heredity_of_different_sizes(a: int, b: int, seed: int, target: str, swap: bool) -> None:
    small, large = pool("Na4Cl4")[a], pool("Na8Cl8")[b]
    first, second = (large, small) if swap else (small, large)
    child = heredity(first, second, CONTENTS[target], limits_for(target), np.random.default_rng(seed))
    if child is not None:
        assert_valid_child(child, target, small, large)
        assert len(child) == sum(CONTENTS[target].values())


def test_heredity_of_different_sizes_usually_succeeds() -> None:
    rng = np.random.default_rng(5)
    made = 0
    pairs = list(itertools.product(range(POOL_SIZE), repeat=2))[::2]
    for k, (a, b) in enumerate(pairs):
        target = "Na4Cl4" if k % 2 else "Na8Cl8"
        child = heredity(pool("Na4Cl4")[a], pool("Na8Cl8")[b], CONTENTS[target], limits_for(target), rng)
        made += child is not None
    assert made / len(pairs) >= 0.85


@fast(40)
@given(name=st.sampled_from(SAME_SIZE), operator=st.sampled_from(OPERATORS), a=INDICES, b=INDICES, seed=SEEDS)
def test_same_generator_state_same_child(name: str, operator: str, a: int, b: int, seed: int) -> None:
    """A search resumed from a checkpointed generator state must propose exactly the same child."""
    original = np.random.default_rng(seed)
    original.random()  # a used generator, as in a running search
    restored = np.random.default_rng(0)
    restored.bit_generator.state = original.bit_generator.state
    first = apply(operator, name, a, b, original)
    second = apply(operator, name, a, b, restored)
    assert (first is None) == (second is None)
    if first is not None and second is not None:
        assert same_structure(first, second)
    assert original.bit_generator.state == restored.bit_generator.state


@pytest.mark.parametrize("operator", OPERATORS)
def test_operators_leave_parents_untouched(operator: str) -> None:
    before = [parent.copy() for parent in pool("Mg4Si2O8")]
    for seed in range(3):
        apply(operator, "Mg4Si2O8", seed, seed + 1, np.random.default_rng(seed))
    assert all(same_structure(x, y) for x, y in zip(before, pool("Mg4Si2O8"), strict=True))


# Measured: 1.00 for every operator and content on these pools. On other pyxtal pools (12 parents, 132
# pairs per content, 8-16 atoms) heredity, permutation, coordinate and soft stay at 1.00 and strain drops
# to 0.88-1.00: it may not move atoms, and pyxtal places pairs right at the engine's limit (its own
# tolerance is 0.5 x the covalent sum, the engine's 0.6 x), where any compression fails. The bounds
# leave room for that and for pyxtal or numpy changes.
MINIMUM_RATE = {"heredity": 0.85, "lattice_strain": 0.8, "permutation": 0.9, "coordinate": 0.9, "soft": 0.9}


@pytest.mark.parametrize("name", SAME_SIZE)
def test_success_rates(name: str) -> None:
    """Validity is the other tests' business; this one counts how often the caller gets a child."""
    rng = np.random.default_rng(11)
    pairs = list(itertools.permutations(range(POOL_SIZE), 2))[:50]
    rates = {}
    for operator in MINIMUM_RATE:
        if operator == "permutation" and len(CONTENTS[name]) == 1:
            continue
        made = sum(apply(operator, name, a, b, rng) is not None for a, b in pairs)
        rates[operator] = made / len(pairs)
    print(f"{name}: " + ", ".join(f"{op} {rate:.2f}" for op, rate in rates.items()))
    assert all(rates[op] >= MINIMUM_RATE[op] for op in rates), rates


# ----------------------------------------------------------------------------------------------------
# single operators


def test_permutation_needs_two_elements() -> None:
    rng = np.random.default_rng(0)
    assert all(permutation(parent, limits_for("Cu4"), rng) is None for parent in pool("Cu4"))


def test_permutation_swaps_species_and_keeps_the_cell() -> None:
    parent = pool("Ga2N2")[0]
    child = permutation(parent, limits_for("Ga2N2"), np.random.default_rng(3))
    assert child is not None
    assert np.allclose(child.lattice.matrix, parent.lattice.matrix)
    assert [s.symbol for s in child.species] != [s.symbol for s in parent.species]


@pytest.mark.parametrize("name", ["Na4Cl4", "Mg4Si2O8"])
def test_lattice_strain_keeps_volume_and_fractional_coordinates(name: str) -> None:
    rng = np.random.default_rng(8)
    for parent in pool(name):
        child = lattice_strain(parent, limits_for(name), rng, sigma=0.1)
        if child is None:
            continue
        assert child.volume == pytest.approx(parent.volume, rel=1e-6)
        assert np.allclose(child.frac_coords % 1.0, parent.frac_coords % 1.0, atol=1e-12)
        assert [s.symbol for s in child.species] == [s.symbol for s in parent.species]
        assert not np.allclose(child.lattice.matrix, parent.lattice.matrix)


def test_coordinate_mutation_keeps_the_cell_and_moves_atoms() -> None:
    parent = pool("Ti2O4")[1]
    child = coordinate_mutation(parent, limits_for("Ti2O4"), np.random.default_rng(4), sigma=0.4)
    assert child is not None
    assert np.allclose(child.lattice.matrix, parent.lattice.matrix)
    assert largest_move(parent, child) > 0.01


@pytest.mark.parametrize("amplitude", [0.3, 1.0])
def test_soft_mutation_moves_atoms_at_most_amplitude(amplitude: float) -> None:
    for name in ("Na4Cl4", "Mg4Si2O8", "Cu4"):
        rng = np.random.default_rng(6)
        for parent in pool(name):
            child = soft_mutation(parent, limits_for(name), rng, amplitude=amplitude)
            if child is None:
                continue
            assert np.allclose(child.lattice.matrix, parent.lattice.matrix)
            assert 0.05 * amplitude < largest_move(parent, child) <= amplitude + SOFT_REPAIR_SLACK + 1e-9


def test_soft_mutation_skips_translations() -> None:
    """In a perfect rock salt nothing needs repair, so the move is exactly a mode: it must not be a
    rigid translation, and being orthogonal to all three, its atoms' displacements sum to zero."""
    parent = rocksalt()
    for seed in range(5):
        child = soft_mutation(parent, limits_for("Na4Cl4"), np.random.default_rng(seed), amplitude=0.3)
        assert child is not None
        diff = child.frac_coords - parent.frac_coords
        diff -= np.round(diff)
        moves = diff @ parent.lattice.matrix
        assert np.linalg.norm(moves, axis=1).max() == pytest.approx(0.3)
        assert np.allclose(moves.sum(axis=0), 0.0, atol=1e-9)


def test_soft_mutation_never_calls_a_calculator(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("soft mutation must not use an interatomic potential")

    for method in ("__init__", "calculate", "get_property"):
        monkeypatch.setattr(Calculator, method, forbidden)
    rng = np.random.default_rng(1)
    children = [soft_mutation(parent, limits_for("Ga2N2"), rng) for parent in pool("Ga2N2")]
    assert any(child is not None for child in children)


def test_heredity_of_identical_cells_keeps_the_cell_shape() -> None:
    parent = rocksalt()
    limits = limits_for("Na4Cl4")
    child = heredity(parent, parent, CONTENTS["Na4Cl4"], limits, np.random.default_rng(2))
    assert child is not None
    reduced = child.lattice.get_niggli_reduced_lattice()
    assert np.allclose(sorted(reduced.abc), [5.64] * 3)
    assert np.allclose(reduced.angles, 90.0)


def test_heredity_into_a_larger_cell_stacks_the_parent() -> None:
    """Parents half the child's size contribute a doubled cell, not a squeezed-in one."""
    parent = rocksalt()
    limits = limits_for("Na8Cl8")
    child = heredity(parent, parent, CONTENTS["Na8Cl8"], limits, np.random.default_rng(2))
    assert child is not None
    assert child.volume == pytest.approx(2 * parent.volume)
    assert np.allclose(sorted(child.lattice.get_niggli_reduced_lattice().abc), [5.64, 5.64, 11.28])


def test_immigrant_respects_the_allowed_groups() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3):
        made = random_immigrant(CONTENTS["Na4Cl4"], limits_for("Na4Cl4"), rng, spacegroups=[221, 225])
        assert made is not None
        assert made[1] in (221, 225)
    # Pm-3m has two one-fold sites: two Na and one Cl cannot be placed; rock salt's primitive cell can
    assert random_immigrant({"Na": 2, "Cl": 1}, limits_for("Na4Cl4"), rng, spacegroups=[221]) is None
    rock_salt = random_immigrant({"Na": 1, "Cl": 1}, limits_for("Na4Cl4"), rng, spacegroups=[225])
    assert rock_salt is not None and len(rock_salt[0]) == 2


# ----------------------------------------------------------------------------------------------------
# checks and repair


def test_make_valid_separates_a_close_pair() -> None:
    broken = rocksalt()
    cl = next(k for k, site in enumerate(broken) if site.specie.symbol == "Cl")
    na_position = broken[0].coords
    broken.replace(cl, "Cl", na_position + np.array([1.2, 0.0, 0.0]), coords_are_cartesian=True)
    limits = limits_for("Na4Cl4")
    assert geometry_problem(broken, limits) != ""
    fixed = make_valid(broken, CONTENTS["Na4Cl4"], limits)
    assert fixed is not None
    assert validity_problem(fixed, CONTENTS["Na4Cl4"], limits) == ""
    assert largest_move(broken, fixed) < 0.5


def test_make_valid_refuses_what_it_cannot_fix() -> None:
    limits = limits_for("Cu4")
    too_thin = Structure(
        Lattice.orthorhombic(1.0, 6.0, 6.0), ["Cu"] * 4, np.random.default_rng(0).random((4, 3))
    )
    assert make_valid(too_thin, CONTENTS["Cu4"], limits) is None
    wrong_content = Structure(Lattice.cubic(4.0), ["Cu"] * 2, [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert make_valid(wrong_content, CONTENTS["Cu4"], limits) is None


@fast(40)
@given(name=st.sampled_from(SAME_SIZE), seed=SEEDS, scale=st.floats(0.6, 1.6))
def test_make_valid_never_returns_an_invalid_structure(name: str, seed: int, scale: float) -> None:
    content, limits = CONTENTS[name], limits_for(name)
    rng = np.random.default_rng(seed)
    n_atoms = sum(content.values())
    volume = np.sqrt(np.prod(limits.volume_per_atom_range)) * n_atoms * scale
    matrix = np.diag(np.full(3, volume ** (1 / 3))) @ (np.eye(3) + rng.normal(0.0, 0.15, (3, 3)))
    species = [el for el, n in content.items() for _ in range(n)]
    result = make_valid(Structure(Lattice(matrix), species, rng.random((n_atoms, 3))), content, limits)
    if result is not None:
        assert validity_problem(result, content, limits) == ""


def test_lattice_problem() -> None:
    limits = limits_for("Cu4")
    assert lattice_problem(Lattice.cubic(4.0).matrix, limits) == ""
    assert lattice_problem(Lattice.from_parameters(4, 4, 4, 10, 90, 90).matrix, limits) != ""
    assert "shorter" in lattice_problem(Lattice.orthorhombic(1.0, 8.0, 8.0).matrix, limits)
    assert "degenerate" in lattice_problem(np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]]), limits)


def test_validity_problem_names_a_content_mismatch() -> None:
    assert "content" in validity_problem(rocksalt(), {"Na": 4, "Cl": 3}, limits_for("Na4Cl4"))


@pytest.mark.parametrize(
    ("content", "group"),
    [({"Al": 4, "O": 6}, 167), ({"Mg": 2, "Al": 4, "O": 8}, 227), ({"Ga": 4, "O": 6}, 12)],
    ids=["corundum R-3c", "spinel Fd-3m", "beta-Ga2O3 C2/m"],
)
def test_centred_groups_are_drawn_in_their_primitive_cell(content: dict[str, int], group: int) -> None:
    """The primitive cells of corundum, spinel and beta-Ga2O3 can only be proposed in their own group as the
    primitive cell of a centred group; the conventional cell would hold 2-4 times the content."""
    from globopt.search.pyxtal_sampling import CellSymmetry, random_symmetric_structure, symmetry_options

    counts = list(content.values())
    options = symmetry_options(counts)
    assert any(o.group == group and o.primitive for o in options)
    if group != 12:  # C2/m also holds Ga4O6 in its conventional cell, another structure than beta-Ga2O3
        assert not any(o.group == group and not o.primitive for o in options)
    assert group in compatible_spacegroups(counts)
    rng = np.random.default_rng(0)
    made = None
    for _ in range(20):
        made = random_symmetric_structure(content, (CellSymmetry(group, primitive=True),), rng, 1.1)
        if not isinstance(made, str):
            break
    assert not isinstance(made, str), made
    structure, drawn = made
    assert drawn == group and len(structure) == sum(counts)
    assert structure.get_space_group_info(symprec=0.01)[1] == group


def test_the_frequency_prior_favours_common_groups_and_rules_none_out() -> None:
    """Olivine's Pnma is far more common among 28-atom cells than an average group; under the frequency
    prior it is drawn several times more often, and no group falls below half its uniform weight."""
    from globopt.search.pyxtal_sampling import symmetry_options

    counts = [8, 4, 16]  # Mg8Si4O16, olivine's cell
    uniform = {(o.group, o.primitive): o.weight for o in symmetry_options(counts, prior="uniform")}
    frequency = {(o.group, o.primitive): o.weight for o in symmetry_options(counts, prior="frequency")}
    assert uniform.keys() == frequency.keys()
    assert sum(uniform.values()) == pytest.approx(1.0) and sum(frequency.values()) == pytest.approx(1.0)
    assert frequency[(62, False)] > 5 * uniform[(62, False)]
    assert all(frequency[key] >= 0.5 * uniform[key] - 1e-12 for key in uniform)


def test_heredity_cuts_between_motifs_rather_than_through_them() -> None:
    """Four O2-like dimers standing along c with wide gaps between them: a random plane along c cuts a
    dimer about half the time, the chosen cut (fewest broken bonds of 8 tries) almost never does."""
    from globopt.search.cells import WorkingCell
    from globopt.search.operators import _bonds_along, _crossings, _motif_preserving_cut

    lattice = np.diag([3.0, 3.0, 12.0])
    frac = np.array([[0, 0, z] for k in range(4) for z in (0.25 * k, 0.25 * k + 0.1)])
    cell = WorkingCell(lattice, frac, np.array(["O"] * 8))
    bonds = _bonds_along(cell)
    assert len(bonds[0]) == 8  # four dimers, each bond seen from both ends
    rng = np.random.default_rng(1)
    chosen = random = 0
    for _ in range(40):
        cut, shift = _motif_preserving_cut(cell, cell, rng)
        planes = np.array([cut.start, cut.start + cut.fraction])
        chosen += (
            _crossings(bonds, cut.axis, planes).sum()
            + _crossings(bonds, cut.axis, planes - shift[cut.axis]).sum()
        )
        planes = rng.random(2)
        random += _crossings(bonds, 2, planes).sum()
    assert chosen < 0.2 * random


def test_symmetric_mutation_keeps_the_parents_space_group() -> None:
    """Rutile (P4_2/mnm, 6 atoms) moved within its group stays P4_2/mnm and is a new structure; a P1 parent
    is declined."""
    from pymatgen.core import Lattice

    rutile = Structure.from_spacegroup(
        "P4_2/mnm", Lattice.tetragonal(4.59, 2.96), ["Ti", "O"], [[0, 0, 0], [0.305, 0.305, 0]]
    )
    limits = geometry_limits({"Ti": 2, "O": 4}, [2, 4], 0.6, (0.4, 8.0))
    rng = np.random.default_rng(4)
    children = [symmetric_mutation(rutile, limits, rng) for _ in range(5)]
    assert all(child is not None for child in children)
    for child in children:
        assert child.get_space_group_info(symprec=1e-3)[1] == 136
        assert validity_problem(child, {"Ti": 2, "O": 4}, limits) == ""
        assert largest_move(rutile, child) > 0.01 or not np.allclose(child.lattice.abc, rutile.lattice.abc)
    skewed = Structure(Lattice([[4.1, 0.3, 0.2], [0.1, 4.4, 0.4], [0.3, 0.2, 3.9]]), ["Ti", "O", "O"],
                       [[0.02, 0.01, 0.03], [0.31, 0.27, 0.05], [0.66, 0.71, 0.52]])  # fmt: skip
    assert (
        symmetric_mutation(skewed, geometry_limits({"Ti": 1, "O": 2}, [1, 2], 0.6, (0.4, 8.0)), rng) is None
    )
