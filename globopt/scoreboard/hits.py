"""Hit detection: did a search find the reference (same structure, or as low in energy)?"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from globopt.search.operators import OPERATORS


@dataclass
class EvaluatedStructure:
    """One relaxation of a search, in the order it finished; ``structure`` None for a failed relaxation.

    ``force_calls``: potential calls the relaxation made (None where a run predates that record);
    ``origin``: what proposed the structure, as the search labels it (``ga:heredity``, ``random:sg12``,
    ``ase-ga:pairing``; see origin_class); ``seconds``: wall time of the relaxation.
    """

    structure: Structure | None
    energy_per_atom: float | None
    finished_at: float
    force_calls: int | None = None
    origin: str = ""
    seconds: float | None = None


@dataclass
class FirstHit:
    evaluations: int  # relaxations used up to and including the hit
    seconds: float  # from the search's start to the hit's commit
    force_calls: int | None  # potential calls of those relaxations; None if any of them is unknown
    origin: str  # what proposed the hit


# Origin labels of the searches, normalised into operator classes so modes can be compared:
#   init           the first generation / start population / first swarm (random structures)
#   immigrant      a random structure added later (GA immigrant, PSO immigrant)
#   pso-regen      a PSO particle re-drawn at random after it stalled or ranked among the worst
#   heredity       cut-and-splice crossover (globopt's heredity, ase-ga's CutAndSplicePairing)
#   lattice_strain strain mutation (globopt's lattice_strain, ase-ga's StrainMutation)
#   permutation, coordinate, soft   the mutations of those names (ase-ga: PermutationMutation, SoftMutation)
#   pso-move       a PSO particle moved toward its own and the swarm's best
#   generator      a structure from a trained generative model (initial_population.generator)
#   random         a random search's structure (every one is random)
# the GA's operators come from its registry, so a new operator has its own class
ORIGIN_CLASSES = (
    "init", "immigrant", "pso-regen", *(name for name in OPERATORS if name != "immigrant"),
    "pso-move", "generator", "random",
)  # fmt: skip
_OPERATOR_CLASS = {
    "start": "init",
    "regen": "pso-regen",
    "move": "pso-move",
    "pairing": "heredity",
    "strain": "lattice_strain",
}


def origin_class(origin: str | None) -> str:
    """``ga:init:sg12`` -> init, ``pso:move:p3`` -> pso-move, ``ase-ga:pairing`` -> heredity, ...

    An origin this function does not know keeps its first two fields (``kind:operator``), so a new
    operator shows up under its own name instead of being counted as another.
    """
    if not origin:
        return "unknown"
    fields = origin.split(":")
    if fields[0] in ("random", "generator"):
        return fields[0]
    operator = fields[1] if len(fields) > 1 else ""
    if fields[0] in ("ga", "pso", "ase-ga") and operator:
        name = _OPERATOR_CLASS.get(operator, operator)
        return name if name in ORIGIN_CLASSES else ":".join(fields[:2])
    return ":".join(fields[:2])


def reference_matcher() -> StructureMatcher:
    """StructureMatcher with tight tolerances and without volume scaling.

    Why tight: the candidate and the reference are relaxed minima of one potential, so a true copy differs
    only by the looser fmax of the search (hundredths of an Å). pymatgen's defaults (ltol 0.2, stol 0.3) are
    meant for comparing different sources, and in 4-atom cells they match wurtzite (u = 0.38) with the
    layered h-BN-like P6_3/mmc structure (u = 0.5) that lies ~50 meV/atom higher under M3GNet for ZnO.
    Why scale=False: a true copy has the reference's volume; with scaling on, a strained high-energy
    look-alike of a 2-4 atom cell matches.
    """
    return StructureMatcher(ltol=0.1, stol=0.15, angle_tol=3, scale=False)


def first_hit(
    evaluations: Iterable[EvaluatedStructure],
    reference: Structure,
    reference_energy: float,
    tolerance: float,
    started_at: float,
) -> FirstHit | None:
    """The first relaxation at or below reference + tolerance, or matching the reference structure.

    Its force calls are summed over every relaxation up to and including it, failed ones too: they were
    paid for, and a search that wastes potential calls on explosions should show it.
    """
    matcher = reference_matcher()
    calls: int | None = 0
    for count, item in enumerate(evaluations, start=1):
        calls = None if calls is None or item.force_calls is None else calls + item.force_calls
        if item.structure is None or item.energy_per_atom is None:
            continue
        if item.energy_per_atom <= reference_energy + tolerance or matcher.fit(item.structure, reference):
            return FirstHit(count, item.finished_at - started_at, calls, item.origin)
    return None


def total_force_calls(evaluations: Iterable[EvaluatedStructure]) -> int | None:
    """Potential calls of every relaxation of a search; None if any is unknown (an older record)."""
    calls = [item.force_calls for item in evaluations]
    return None if any(c is None for c in calls) else sum(calls)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
