"""Numbered random symmetric structures that any process can build: the way random generation leaves rank 0.

A pyxtal structure costs rank 0 about 35 ms of CPU, and tiny cells need several proposals per relaxation
(repeats and rejections), so under MPI the master spent most of its time generating structures its
workers could have made. A ``RandomStream`` numbers its structures instead of drawing them from one
generator: structure ``k`` is built from a seed derived from (run seed, stream, k) alone, so it is the same
whether rank 0 builds it or a worker does, and in whatever order. The engine hands recipes for the next
few numbers to workers along with their relaxations (``RelaxTask.generate``); they come back built and
already prepared for screening (geometry verdict, symmetry key, reduced cell), and the search consumes
them strictly in order, building any that have not arrived itself. A search's checkpoint is therefore
just the next number: resume, serial or MPI, any rank count, all give the same sequence.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymatgen.core import Structure

from globopt.candidate import Screening
from globopt.geometry import GeometryLimits, geometry_problem
from globopt.search.pyxtal_sampling import CellSymmetry

# stream identifiers that go into the seed: two streams of one run never share structures
STREAM_IDS = {"random": 0, "ga-random": 1}


@dataclass(frozen=True)
class RandomRecipe:
    """Everything needed to build structure ``index`` of a stream; small and picklable."""

    stream: str  # a key of STREAM_IDS
    seed: int
    index: int
    # allowed cell contents, drawn uniformly, each with the (group, cell) options that can hold it (found
    # once on rank 0: checking all 230 groups takes a worker seconds, long enough to look dead)
    contents: tuple[tuple[tuple[tuple[str, int], ...], tuple[CellSymmetry, ...]], ...]
    volume_factor: float
    attempts: int  # pyxtal draws before giving up on this number
    # GA immigrants must also pass the operators' validity check (search/operators.py), which needs limits
    check_limits: bool = False

    def build(self, limits: GeometryLimits | None) -> GeneratedStructure:
        return build(self, limits)

    def screening_limits(self, limits: GeometryLimits) -> GeometryLimits:
        """The geometry limits its structure is screened with: the worker's (those of the whole run)."""
        return limits

    # the structure built here is the proposal itself, so its archive JSON can be made here too
    keeps_structure = True


@dataclass
class GeneratedStructure:
    """A built recipe: the structure and its space group, or why none could be made."""

    recipe: RandomRecipe
    structure: Structure | None
    spacegroup: int | None
    error: str = ""
    screening: Screening | None = None  # filled in on a worker, so rank 0 does not recompute it


def build(recipe: RandomRecipe, limits: GeometryLimits | None) -> GeneratedStructure:
    """Build one numbered structure (deterministic in the recipe; the limits only matter for GA streams)."""
    from globopt.search.cells import finish_random
    from globopt.search.pyxtal_sampling import random_symmetric_structure

    rng = np.random.default_rng([recipe.seed, STREAM_IDS[recipe.stream], recipe.index])
    if not recipe.contents:
        return GeneratedStructure(recipe, None, None, "no space group can hold any allowed cell content")
    last_error = ""
    for _ in range(recipe.attempts):
        items, options = recipe.contents[int(rng.integers(len(recipe.contents)))]
        content = {el: n for el, n in items if n}
        made = random_symmetric_structure(content, options, rng, recipe.volume_factor)
        if isinstance(made, str):
            last_error = made
            continue
        structure, group = made
        if recipe.check_limits:
            if limits is None:
                raise ValueError(f"stream {recipe.stream!r} needs geometry limits to build structures")
            finished = finish_random(structure, content, limits)
            if finished is None:
                last_error = f"random structure in group {group} failed the operators' validity check"
                continue
            structure = finished
        return GeneratedStructure(recipe, structure, group)
    error = f"{recipe.attempts} pyxtal draws failed (last: {last_error})"
    return GeneratedStructure(recipe, None, None, error)


def build_for_screening(
    recipes: Iterable[Any],
    limits: GeometryLimits,
    symprec: float,
    between: Callable[[], None] | None = None,
) -> list[GeneratedStructure]:
    """Build recipes and prepare each result for rank 0's screening; run by workers after a relaxation.

    A recipe is a RandomRecipe or anything else with ``build(limits)`` and ``screening_limits(limits)``
    (a screen's next structures, globopt/htvs/search.py). ``between`` runs after every structure: MPI
    workers send heartbeats and honour stop requests from it. A failure to build is recorded in the
    result, never raised: the search then builds or prepares that structure itself.
    """
    from globopt.duplicates import bucket_key, lattice_minima, reduced_for_matching, structure_fingerprint
    from globopt.structure_codec import structure_to_json

    built = []
    for recipe in recipes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                item = recipe.build(limits)
                if item.structure is not None:
                    problem = geometry_problem(item.structure, recipe.screening_limits(limits))
                    as_json = structure_to_json(item.structure) if recipe.keeps_structure else None
                    item.screening = Screening(problem, None, None, structure_json=as_json)
                    if not problem:
                        reduced = reduced_for_matching(item.structure)
                        key = bucket_key(item.structure, symprec)
                        item.screening = Screening(
                            problem, key, reduced, lattice_minima(reduced), as_json,
                            fingerprint=structure_fingerprint(reduced),
                        )  # fmt: skip
        except Exception as exc:  # a worker must never fail its relaxation result over a prefetch
            item = GeneratedStructure(recipe, None, None, f"{type(exc).__name__}: {exc}")
        built.append(item)
        if between is not None:
            between()
    return built


class RandomStream:
    """Consumes numbered structures in order; numbers built elsewhere are used when they have arrived.

    Only ``next_index`` is search state. Structures built ahead of time are a cache: losing them (a kill,
    a dead worker) only means building them again.
    """

    def __init__(
        self,
        stream: str,
        seed: int,
        contents: Iterable[dict[str, int]],
        spacegroups: Iterable[int] | None,
        volume_factor: float,
        attempts: int,
        limits: GeometryLimits | None = None,
        check_limits: bool = False,
        prior: str = "uniform",
    ) -> None:
        from globopt.search.pyxtal_sampling import symmetry_options

        self.stream = stream
        self.seed = seed
        allowed = list(spacegroups) if spacegroups else None
        with_groups = []
        for content in contents:
            counts = [n for n in content.values() if n]
            if options := symmetry_options(counts, allowed, prior):
                with_groups.append((tuple(content.items()), options))
        self.contents = tuple(with_groups)
        self.volume_factor = volume_factor
        self.attempts = attempts
        self.limits = limits
        self.check_limits = check_limits
        self.next_index = 0
        self.arrived: dict[int, GeneratedStructure] = {}
        self.requested: set[int] = set()
        self.built_here = 0  # numbers rank 0 had to build itself (the prefetch was late or off)
        self.built_elsewhere = 0

    def recipe(self, index: int) -> RandomRecipe:
        return RandomRecipe(
            self.stream, self.seed, index, self.contents, self.volume_factor, self.attempts,
            self.check_limits,
        )  # fmt: skip

    def next(self) -> GeneratedStructure:
        index = self.next_index
        self.next_index += 1
        self.requested.discard(index)
        item = self.arrived.pop(index, None)
        if item is None or item.structure is None:  # not here yet, or failed there: build it here
            self.built_here += 1
            return build(self.recipe(index), self.limits)
        self.built_elsewhere += 1
        return item

    def requests(self, count: int, lookahead: int) -> list[RandomRecipe]:
        """Up to ``count`` numbers within ``lookahead`` of the next one that nobody is building yet."""
        wanted = []
        for index in range(self.next_index, self.next_index + lookahead):
            if len(wanted) >= count:
                break
            if index not in self.arrived and index not in self.requested:
                self.requested.add(index)
                wanted.append(self.recipe(index))
        return wanted

    def deliver(self, items: Iterable[GeneratedStructure]) -> None:
        for item in items:
            index = item.recipe.index
            self.requested.discard(index)
            if index >= self.next_index and item.structure is not None:
                self.arrived[index] = item

    def lost(self, recipes: Iterable[RandomRecipe]) -> None:
        """The worker building these died: they may be requested again."""
        for recipe in recipes:
            self.requested.discard(recipe.index)

    def restart_at(self, index: int) -> None:
        """Resume: continue from this number (everything built ahead is forgotten)."""
        self.next_index = index
        self.arrived.clear()
        self.requested.clear()

    def owns(self, recipe: Any) -> bool:
        return isinstance(recipe, RandomRecipe) and recipe.stream == self.stream and recipe.seed == self.seed
