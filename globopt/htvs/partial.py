"""Partial substitution: replace a fraction of one species' sites, keeping symmetry-distinct orderings.

Orderings are drawn in a fixed (lexicographic) order of site combinations and compared with
StructureMatcher, so the same config always yields the same orderings, and at most ``max_structures``
per template are kept. Combinations are walked lazily and the walk is capped, so a large supercell does
not enumerate C(n, k) candidates to find a handful.
"""

from __future__ import annotations

import itertools

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from globopt.htvs.settings import PartialSpec

# Site combinations examined per template before giving up on finding more distinct orderings.
MAX_COMBINATIONS_TRIED = 2000


class PartialSubstitutionError(ValueError):
    """The partial substitution cannot be applied as configured."""


def partial_orderings(template: Structure, spec: PartialSpec, max_atoms: int) -> list[tuple[str, Structure]]:
    """(label, structure) of each distinct ordering; [] when the template has no ``spec.site`` sites."""
    cell = template * spec.supercell
    sites = [i for i, site in enumerate(cell) if site.specie.symbol == spec.site]
    if not sites:
        return []
    if len(cell) > max_atoms:
        raise PartialSubstitutionError(
            f"partial {spec.site}->{spec.by}: supercell {spec.supercell} has {len(cell)} atoms, more than "
            f"htvs.max_atoms={max_atoms}"
        )
    count = round(spec.fraction * len(sites))
    if not 0 < count < len(sites):
        raise PartialSubstitutionError(
            f"partial {spec.site}->{spec.by}: fraction {spec.fraction} of {len(sites)} {spec.site} sites "
            f"replaces {count}; enlarge htvs.partial.supercell or change the fraction"
        )
    matcher = StructureMatcher(primitive_cell=False, scale=False, attempt_supercell=False)
    kept: list[tuple[str, Structure]] = []
    for tried, chosen in enumerate(itertools.combinations(sites, count)):
        if tried >= MAX_COMBINATIONS_TRIED or len(kept) >= spec.max_structures:
            break
        ordering = cell.copy()
        for index in chosen:
            ordering.replace(index, spec.by)
        if any(matcher.fit(ordering, other) for _, other in kept):
            continue
        label = f"{spec.by}{count}/{len(sites)}@{spec.site}#{len(kept) + 1}"
        kept.append((label, ordering))
    return kept
