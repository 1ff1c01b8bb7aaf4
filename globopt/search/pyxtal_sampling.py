"""Random symmetric structures from pyxtal: the sampling primitive every search builds on.

Space groups compatible with the cell content are found once per content; pyxtal places the atoms on
Wyckoff positions of a group drawn from them. Every call takes its randomness from the generator passed in,
so a checkpointed search that restores its generator draws the same structures.

A centred group (A, C, I, F, R) can be drawn in two cells: its conventional cell, which must hold the
content, or its primitive cell, 1/2, 1/3 or 1/4 of the conventional one. The primitive cells matter: the
10-atom cell of corundum is the primitive cell of R-3c (30 atoms conventional), the 14-atom cell of
spinel that of Fd-3m (56), and a search that drew only conventional cells could never propose either
group for those contents.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import numpy as np
from pymatgen.core import Structure
from pyxtal import operations as pyxtal_operations
from pyxtal import pyxtal
from pyxtal.symmetry import Group
from pyxtal.tolerance import Tol_matrix

# Space-group priors for random structures. "uniform": every compatible group equally likely.
# "frequency": half of that, half the frequency of (group, atoms in the conventional cell) among the
# Materials Project structures pyxtal tabulates (pyxtal/database/spg_num_wps_mp.csv). Half uniform keeps
# every compatible group at least half as likely as under "uniform", so a rare ground state is never
# ruled out, while common groups (P-1, P2_1/c, Pnma, C2/m, ...) for this number of atoms are drawn
# several times more often.
SPACEGROUP_PRIORS = ("uniform", "frequency")
FREQUENCY_SHARE = 0.5


class CellSymmetry(NamedTuple):
    """A space group, whether the cell is the primitive cell of that (centred) group, and how likely a
    random structure is drawn in it."""

    group: int
    primitive: bool = False
    weight: float = 1.0


def compatible_spacegroups(counts: list[int], allowed: list[int] | None = None) -> list[int]:
    """Space groups that can hold exactly these atom counts, in their conventional or primitive cell."""
    return sorted({option.group for option in symmetry_options(counts, allowed)})


def symmetry_options(
    counts: list[int], allowed: list[int] | None = None, prior: str = "uniform"
) -> tuple[CellSymmetry, ...]:
    """Every (group, cell) in which pyxtal can place exactly these atom counts, weighted by ``prior``."""
    if prior not in SPACEGROUP_PRIORS:
        raise ValueError(f"unknown space-group prior {prior!r}; expected one of {SPACEGROUP_PRIORS}")
    return _options(tuple(counts), tuple(allowed) if allowed else None, prior)


@functools.lru_cache(maxsize=256)
def _options(
    counts: tuple[int, ...], allowed: tuple[int, ...] | None, prior: str
) -> tuple[CellSymmetry, ...]:
    # cached: checking all 230 groups costs more than generating a structure
    cells: list[tuple[int, bool, int]] = []  # (group, primitive, atoms in the conventional cell)
    n_atoms = sum(counts)
    for number in allowed or range(1, 231):
        group = _group(number)
        if group.check_compatible(list(counts))[0]:
            cells.append((number, False, n_atoms))
        centring = group.cellsize()
        if centring > 1 and group.check_compatible([n * centring for n in counts])[0]:
            cells.append((number, True, n_atoms * centring))
    if not cells:
        return ()
    # uniform over groups, then over each group's cells
    per_group = {number: sum(1 for c in cells if c[0] == number) for number, _, _ in cells}
    uniform = [1.0 / (len(per_group) * per_group[number]) for number, _, _ in cells]
    weights = uniform
    if prior == "frequency":
        table = _materials_project_frequencies()
        counted = [table.get((number, conventional), 0) for number, _, conventional in cells]
        total = sum(counted)
        if total:
            weights = [
                (1 - FREQUENCY_SHARE) * u + FREQUENCY_SHARE * c / total
                for u, c in zip(uniform, counted, strict=True)
            ]
    return tuple(
        CellSymmetry(number, primitive, weight)
        for (number, primitive, _), weight in zip(cells, weights, strict=True)
    )


@functools.cache
def _materials_project_frequencies() -> dict[tuple[int, int], int]:
    """(space group, atoms in the conventional cell) -> structures of Materials Project (pyxtal's table)."""
    import csv
    from importlib.resources import files

    table: dict[tuple[int, int], int] = {}
    with files("pyxtal").joinpath("database/spg_num_wps_mp.csv").open() as handle:
        for row in csv.DictReader(handle):
            key = (int(row["spg"]), int(row["n_atoms"]))
            table[key] = table.get(key, 0) + int(row["count"])
    return table


@functools.cache
def _group(number: int) -> Group:
    """pyxtal's Group parses every Wyckoff operation from text (about 15 ms); built once per group.

    pyxtal only reads the Group it is given (it deep-copies the Wyckoff sites it fills), so sharing one
    instance between calls gives the same structures as building a fresh one each time.
    """
    return Group(number)


def _shared_tolerances() -> Tol_matrix:
    """One atomic tolerance matrix for every pyxtal call.

    Building a Tol_matrix walks the whole periodic table (about 5 ms). pyxtal builds one per call when none
    is passed, and its Wyckoff merge step calls ``check_images`` without one some twenty times per
    structure, so a random structure spent more than half of its time there. ``check_images`` only reads
    the matrix, so giving it a shared default changes nothing but the time (measured: 100 -> 35 ms of CPU
    per Cu4Au4 structure, identical structures for the same seed).
    """
    tolerances = Tol_matrix(prototype="atomic")
    defaults = list(pyxtal_operations.check_images.__defaults__ or ())
    if len(defaults) == 4 and defaults[1] is None:  # (PBC, tm, tol, d_factor) in pyxtal 1.x
        defaults[1] = tolerances
        pyxtal_operations.check_images.__defaults__ = tuple(defaults)
    return tolerances


_TOLERANCES = _shared_tolerances()


def pyxtal_rng(rng: np.random.Generator) -> np.random.Generator:
    """A fresh generator for one pyxtal call, seeded from ours.

    pyxtal ``spawn``s children from the generator it is given; spawning depends on a counter in the
    generator's SeedSequence that ``bit_generator.state`` does not capture, so handing pyxtal our own
    generator would make a resumed search diverge from the original one.
    """
    return np.random.default_rng(int(rng.integers(2**63)))


def random_symmetric_structure(
    content: dict[str, int],
    options: tuple[CellSymmetry, ...],
    rng: np.random.Generator,
    volume_factor: float,
) -> tuple[Structure, int] | str:
    """One pyxtal structure of exactly ``content``; an error text when pyxtal could not fill the cell.

    The (group, cell) is drawn with the options' weights (symmetry_options).
    """
    weights = np.array([option.weight for option in options], dtype=float)
    option = options[int(rng.choice(len(options), p=weights / weights.sum()))]
    group = option.group
    crystal = pyxtal()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            crystal.from_random(
                3, _group(group), list(content), list(content.values()), factor=volume_factor,
                random_state=pyxtal_rng(rng), tm=_TOLERANCES, conventional=not option.primitive,
            )  # fmt: skip
    except Exception as exc:  # pyxtal signals failure to place atoms with several exception types
        return f"{type(exc).__name__}: {exc}"
    if not crystal.valid:
        return f"pyxtal produced no valid structure in group {group}"
    structure = crystal.to_pymatgen()
    if option.primitive:  # pyxtal hands back the conventional cell of what it built
        structure = structure.get_primitive_structure()
        wanted = {el: n for el, n in content.items() if n}
        if {el.symbol: int(n) for el, n in structure.composition.items()} != wanted:
            return f"the primitive cell of the group-{group} structure does not hold {wanted}"
    return structure, group
