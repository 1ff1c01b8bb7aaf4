"""GA children planned ahead of their turn, so that workers build them instead of rank 0.

Under MPI a GA's rank 0 spent most of its CPU making children (a heredity child is about 5 ms) and
reducing them for duplicate screening, work that needs no search state once the parents and the operator
are chosen. So with workers in other processes the GA *plans* its next children when the engine asks
for structures to build ahead: operator and parents are drawn from the search state of that moment, the
child gets a number, and its recipe (parents as plain arrays, operator, seed) travels to a worker with
a relaxation. The child comes back built and prepared for screening; the search takes plans strictly in
order, building any that have not arrived itself. Parents are therefore chosen from a population up to
two relaxation times older than when the child is proposed, about twice the steady state's own lag (every
child is bred while its siblings are still relaxing); with many ranks that is a generational GA's lag.

Child ``k``'s randomness comes from (run seed, k) alone, so it is the same wherever it is built. The
plans (number, operator, parent ids) are search state and checkpointed; a plan whose parent has left
the population by a resume is dropped. In-process runs never plan ahead: each child is made on the spot
from the search's own generator, so a serial run's children do not depend on what could be built ahead.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymatgen.core import Structure

from globopt.candidate import ArchivedCell, Screening
from globopt.geometry import GeometryLimits
from globopt.search.operators import VARIATION_OPERATORS, parent_content
from globopt.search.random_stream import GeneratedStructure

# Seeds a child's generator together with the run seed and the child's number (search/random_stream.py
# uses 0 and 1 for its streams).
CHILD_STREAM_ID = 2
# The error of a recipe whose operator made no valid child: deterministic, so not worth building again
NO_CHILD = "the operator made no valid child"


@dataclass
class PlannedChild:
    """One child decided ahead of its turn: which operator, from which population members."""

    number: int
    operator: str
    parents: tuple[Any, ...]  # ga.Member, held in memory (they may leave the population meanwhile)

    @property
    def parent_ids(self) -> tuple[int, ...]:
        return tuple(p.candidate_id for p in self.parents)

    @property
    def is_immigrant(self) -> bool:
        """A fresh random structure (from the random stream), not a child of members."""
        return VARIATION_OPERATORS[self.operator].make is None

    @property
    def makes_child(self) -> bool:
        """False for an immigrant and for a crossover of a member with itself (a failed try, as when
        drawn on the spot)."""
        return not self.is_immigrant and len(set(self.parent_ids)) == len(self.parents)


@dataclass(frozen=True)
class ChildRecipe:
    """Everything a worker needs to build one planned child; small and picklable."""

    seed: int
    number: int
    operator: str
    parents: tuple[ArchivedCell, ...]
    content: tuple[tuple[str, int], ...]
    limits: GeometryLimits
    ga: Any  # the run's GAConfig (operator widths)
    # the child is the proposal itself, so its archive JSON can be made where it is built
    keeps_structure = True

    def build(self, limits: GeometryLimits | None = None) -> GeneratedStructure:
        structures = tuple(cell.structure() for cell in self.parents)
        child = make_child(self.operator, structures, dict(self.content), self.limits, self.seed, self.number,
                           self.ga)  # fmt: skip
        return GeneratedStructure(self, child, None, "" if child is not None else NO_CHILD)

    def screening_limits(self, limits: GeometryLimits) -> GeometryLimits:
        return self.limits


def make_child(
    operator: str,
    parents: tuple[Structure, ...],
    content: dict[str, int],
    limits: GeometryLimits,
    seed: int,
    number: int,
    ga: Any,
) -> Structure | None:
    """Child ``number`` of the run: the same structure on rank 0 and on any worker."""
    rng = np.random.default_rng([seed, CHILD_STREAM_ID, number])
    return VARIATION_OPERATORS[operator].make(parents, content, limits, rng, ga)


class ChildPlans:
    """The planned children in order, and those built ahead (the build-ahead interface of
    search/random_stream.RandomStream for the children)."""

    def __init__(self, seed: int, limits: GeometryLimits, ga: Any) -> None:
        self.seed = seed
        self.limits = limits
        self.ga = ga
        self.planned: deque[PlannedChild] = deque()
        self.next_number = 0
        self.taken = 0
        self.requested: set[int] = set()
        self.arrived: dict[int, GeneratedStructure] = {}
        self.built_here = 0
        self.built_elsewhere = 0

    def add(self, operator: str, parents: tuple[Any, ...]) -> PlannedChild:
        plan = PlannedChild(self.next_number, operator, parents)
        self.next_number += 1
        self.planned.append(plan)
        return plan

    def take(self) -> PlannedChild | None:
        """The next planned child, or None when nothing is planned (the search then draws on the spot)."""
        if not self.planned:
            return None
        self.taken += 1
        return self.planned.popleft()

    def build(self, plan: PlannedChild) -> tuple[Structure | None, Screening | None]:
        """The planned child and its screening data: as a worker built it, or built here now (None: the
        operator made no valid child)."""
        self.requested.discard(plan.number)
        item = self.arrived.pop(plan.number, None)
        if item is not None and (item.structure is not None or item.error == NO_CHILD):
            self.built_elsewhere += 1
            return item.structure, item.screening
        self.built_here += 1
        structures = tuple(p.structure for p in plan.parents)
        child = make_child(plan.operator, structures, parent_content(structures[0]), self.limits, self.seed,
                           plan.number, self.ga)  # fmt: skip
        return child, None

    def recipe(self, plan: PlannedChild) -> ChildRecipe:
        structures = tuple(p.structure for p in plan.parents)
        cells = tuple(ArchivedCell.of(p.candidate_id, p.structure) for p in plan.parents)
        content = tuple(parent_content(structures[0]).items())
        return ChildRecipe(self.seed, plan.number, plan.operator, cells, content, self.limits, self.ga)

    def requests(self, count: int) -> list[ChildRecipe]:
        """Recipes of planned children that nobody is building yet, in plan order."""
        wanted = []
        for plan in self.planned:
            if len(wanted) >= count:
                break
            if plan.makes_child and plan.number not in self.requested and plan.number not in self.arrived:
                self.requested.add(plan.number)
                wanted.append(self.recipe(plan))
        return wanted

    def owns(self, recipe: Any) -> bool:
        return isinstance(recipe, ChildRecipe) and recipe.seed == self.seed

    def deliver(self, items: Iterable[GeneratedStructure]) -> None:
        waiting = {plan.number for plan in self.planned}
        for item in items:
            number = item.recipe.number
            self.requested.discard(number)
            if number in waiting:
                self.arrived[number] = item

    def lost(self, recipes: Iterable[ChildRecipe]) -> None:
        for recipe in recipes:
            self.requested.discard(recipe.number)

    def state_dict(self) -> dict[str, Any]:
        plans = [{"n": p.number, "op": p.operator, "parents": list(p.parent_ids)} for p in self.planned]
        return {"next": self.next_number, "planned": plans}

    def load_state_dict(self, state: dict[str, Any] | None, members: dict[int, Any]) -> None:
        """Restore the plans whose parents are all still members (``members``: id -> Member)."""
        self.planned.clear()
        self.requested.clear()
        self.arrived.clear()
        state = state or {}
        self.next_number = int(state.get("next", 0))
        for entry in state.get("planned", []):
            if all(i in members for i in entry["parents"]):
                parents = tuple(members[i] for i in entry["parents"])
                self.planned.append(PlannedChild(int(entry["n"]), entry["op"], parents))


class GeneticBuildAhead:
    """What a GA lets workers build ahead: its planned children, and the random structures of its
    first generation and immigrants (the engine sees one build-ahead interface)."""

    def __init__(self, search: Any) -> None:
        self.search = search  # ga.GeneticSearch: plans children on request

    @property
    def children(self) -> ChildPlans:
        return self.search.children

    @property
    def next_index(self) -> int:
        """Structures taken so far (the engine's measure of how many a relaxation uses up)."""
        return self.search.random_stream.next_index + self.children.taken

    @property
    def built_here(self) -> int:
        return self.search.random_stream.built_here + self.children.built_here

    @property
    def built_elsewhere(self) -> int:
        return self.search.random_stream.built_elsewhere + self.children.built_elsewhere

    def requests(self, count: int, lookahead: int) -> list[Any]:
        random_stream = self.search.random_stream
        if not self.search.plans_children():
            return random_stream.requests(count, lookahead)
        # as deep as the engine looks ahead: about the children rank 0 takes while two relaxations run, so
        # a worker's build arrives before its turn (half that depth left one child in ten to rank 0)
        self.search.plan_children(count, lookahead)
        # random structures first: they cost a worker (and rank 0, when late) far more than a child, and
        # need no search state, so they are asked for as far ahead as the engine looks, in the share the
        # operators draw them, beyond the immigrants already planned
        planned = sum(plan.is_immigrant for plan in self.children.planned)
        ahead = planned + math.ceil(self.search.immigrant_share() * lookahead)
        wanted: list[Any] = random_stream.requests(count, ahead) if ahead else []
        return wanted + self.children.requests(count - len(wanted))

    def owns(self, recipe: Any) -> bool:
        return self.children.owns(recipe) or self.search.random_stream.owns(recipe)

    def deliver(self, items: Iterable[GeneratedStructure]) -> None:
        items = list(items)
        self.children.deliver(i for i in items if self.children.owns(i.recipe))
        random_stream = self.search.random_stream
        random_stream.deliver(i for i in items if random_stream.owns(i.recipe))

    def lost(self, recipes: Iterable[Any]) -> None:
        recipes = list(recipes)
        self.children.lost(r for r in recipes if self.children.owns(r))
        random_stream = self.search.random_stream
        random_stream.lost(r for r in recipes if random_stream.owns(r))
