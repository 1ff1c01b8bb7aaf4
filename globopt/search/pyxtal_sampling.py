"""Random symmetric structures from pyxtal: the sampling primitive every search builds on.

Space groups compatible with the cell content are found once per content; pyxtal places the atoms on
Wyckoff positions of a group drawn from them. Every call takes its randomness from the generator passed in,
so a checkpointed search that restores its generator draws the same structures.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
from pymatgen.core import Structure
from pyxtal import operations as pyxtal_operations
from pyxtal import pyxtal
from pyxtal.symmetry import Group
from pyxtal.tolerance import Tol_matrix


def compatible_spacegroups(counts: list[int], allowed: list[int] | None = None) -> list[int]:
    """Space groups whose Wyckoff multiplicities can hold exactly these atom counts."""
    return list(_compatible(tuple(counts), tuple(allowed) if allowed else None))


@functools.lru_cache(maxsize=256)
def _compatible(counts: tuple[int, ...], allowed: tuple[int, ...] | None) -> tuple[int, ...]:
    # cached: checking all 230 groups costs more than generating a structure
    return tuple(g for g in allowed or range(1, 231) if _group(g).check_compatible(list(counts))[0])


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
    content: dict[str, int], groups: list[int], rng: np.random.Generator, volume_factor: float
) -> tuple[Structure, int] | str:
    """One pyxtal structure in a group drawn from ``groups``; an error text when pyxtal could not fill it."""
    group = int(rng.choice(groups))
    crystal = pyxtal()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            crystal.from_random(
                3, _group(group), list(content), list(content.values()), factor=volume_factor,
                random_state=pyxtal_rng(rng), tm=_TOLERANCES,
            )  # fmt: skip
    except Exception as exc:  # pyxtal signals failure to place atoms with several exception types
        return f"{type(exc).__name__}: {exc}"
    if not crystal.valid:
        return f"pyxtal produced no valid structure in group {group}"
    return crystal.to_pymatgen(), group
