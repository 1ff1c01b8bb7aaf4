"""HTVS as a search algorithm: the engine asks for proposals, the enumeration streams them.

The whole state is a cursor into the enumeration plus counters, stored by the engine in the same SQLite
transaction as each candidate row. After a kill, the engine re-issues the pending rows and this search
continues after the last stored proposal: every enumerated structure is evaluated exactly once.

Building a substituted cell costs rank 0 little; preparing it for the duplicate screen (Niggli and
primitive reduction, space group) costs it about a millisecond. With workers in other processes the
search therefore reads a few structures ahead, and their preparation travels to workers with their tasks
(:class:`PreparedAhead`, the same mechanism that has random structures built on workers): rank 0 only
looks the prepared result up when the structure's turn comes, or prepares it itself if it has not arrived.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pymatgen.core import Structure

from globopt.candidate import ArchivedCell, Proposal, Screening
from globopt.geometry import GeometryLimits
from globopt.htvs.enumeration import Enumeration
from globopt.htvs.limits import composition_limits, envelope_limits
from globopt.search.base import SearchAlgorithm, SearchExhausted

log = logging.getLogger("globopt")


@dataclass(frozen=True)
class ScreenRecipe:
    """A screen's structure number ``number``, for a worker to prepare (search/random_stream.py's
    build_for_screening calls ``build`` and ``screening_limits``)."""

    number: int
    cell: ArchivedCell  # the structure as plain arrays (candidate_id unused)
    limits: GeometryLimits  # its composition's geometry limits
    # the proposal stays rank 0's own structure: the worker's copy is only prepared, never archived
    keeps_structure = False

    def build(self, limits: GeometryLimits | None):
        from globopt.search.random_stream import GeneratedStructure

        return GeneratedStructure(self, self.cell.structure(), None)

    def screening_limits(self, limits: GeometryLimits) -> GeometryLimits:
        return self.limits


@dataclass
class _Upcoming:
    """A structure read ahead of its turn, with the enumeration cursor just after it."""

    number: int
    proposal: Proposal
    block: int
    index: int
    skipped: int


class PreparedAhead:
    """The engine's view of a screen's read-ahead (search/base.BuildAhead):
    which upcoming structures workers should prepare, and their prepared screening data when it arrives."""

    def __init__(self, search: HtvsSearch) -> None:
        self.search = search
        self.requested: set[int] = set()
        self.arrived: dict[int, Screening] = {}
        self.built_here = 0  # structures prepared by rank 0 (none arrived in time)
        self.built_elsewhere = 0

    @property
    def next_index(self) -> int:
        return self.search.proposed_count

    def requests(self, count: int, lookahead: int) -> list[ScreenRecipe]:
        wanted = []
        for upcoming in self.search.read_ahead(lookahead):
            if len(wanted) >= count:
                break
            if upcoming.number not in self.requested and upcoming.number not in self.arrived:
                self.requested.add(upcoming.number)
                structure = upcoming.proposal.structure
                limits = self.search.limits_for(structure)
                wanted.append(
                    ScreenRecipe(upcoming.number, ArchivedCell.of(upcoming.number, structure), limits)
                )
        return wanted

    def owns(self, recipe: Any) -> bool:
        return isinstance(recipe, ScreenRecipe)

    def deliver(self, items: Iterable[Any]) -> None:
        for item in items:
            number = item.recipe.number
            self.requested.discard(number)
            if number >= self.next_index and item.screening is not None:
                self.arrived[number] = item.screening

    def lost(self, recipes: Iterable[Any]) -> None:
        for recipe in recipes:
            self.requested.discard(recipe.number)

    def take(self, number: int) -> Screening | None:
        """The prepared screening data of structure ``number``, if a worker sent it."""
        self.requested.discard(number)
        screening = self.arrived.pop(number, None)
        if screening is None:
            self.built_here += 1
        else:
            self.built_elsewhere += 1
        return screening

    def clear(self) -> None:
        self.requested.clear()
        self.arrived.clear()


class HtvsSearch(SearchAlgorithm):
    # The engine ends a run cleanly (not as an error) when a finite search is exhausted.
    finite = True

    def __init__(
        self,
        enumeration: Enumeration,
        stop_after: int | None = None,
        min_distance_factor: float = 0.6,
        volume_factor_range: tuple[float, float] = (0.4, 8.0),
    ) -> None:
        self.enumeration = enumeration
        self.stop_after = stop_after
        self.min_distance_factor = min_distance_factor
        self.volume_factor_range = volume_factor_range
        # the relaxation's guards need one set of limits for every composition the screen can produce
        self.limits = envelope_limits(enumeration.elements, min_distance_factor, volume_factor_range)
        self._limits_by_formula: dict[str, GeometryLimits] = {}
        self.block = 0
        self.index = 0
        self.proposed_count = 0
        self.skipped_count = 0
        # read ahead of the stored cursor (derived, never stored: a resume reads them again)
        self._ahead: deque[_Upcoming] = deque()
        self._read = (0, 0, 0)  # block, index, skipped after the last structure read ahead
        self.prepared_ahead = PreparedAhead(self)
        self.build_ahead = self.prepared_ahead

    @property
    def size_hint(self) -> int:
        """Structures the screen will propose at most (before charge/injectivity filters and duplicates)."""
        total = len(self.enumeration)
        return min(total, self.stop_after) if self.stop_after else total

    def limits_for(self, structure: Structure) -> GeometryLimits:
        """Each proposal is checked against the limits of its own composition (cached per formula)."""
        formula = structure.composition.reduced_formula
        if formula not in self._limits_by_formula:
            self._limits_by_formula[formula] = composition_limits(
                structure, self.min_distance_factor, self.volume_factor_range
            )
        return self._limits_by_formula[formula]

    def propose(self) -> Proposal:
        if self.stop_after is not None and self.proposed_count >= self.stop_after:
            raise SearchExhausted(f"htvs.stop_after={self.stop_after} structures proposed")
        if not self.read_ahead(1):
            raise SearchExhausted(
                f"screen enumerated: {self.proposed_count} structures proposed, "
                f"{self._read[2]} substitutions skipped by filters"
            )
        upcoming = self._ahead.popleft()
        self.block, self.index, self.skipped_count = upcoming.block, upcoming.index, upcoming.skipped
        self.proposed_count += 1
        proposal = upcoming.proposal
        proposal.screening = self.prepared_ahead.take(upcoming.number)
        return proposal

    def read_ahead(self, count: int) -> list[_Upcoming]:
        """The next ``count`` structures to propose (fewer at the end of the enumeration), read now."""
        blocks = self.enumeration.blocks
        block, index, skipped = self._read
        while len(self._ahead) < count:
            while block < len(blocks) and index >= len(blocks[block]):
                block, index = block + 1, 0
            if block >= len(blocks):
                break
            item = self.enumeration.item(block, index)
            index += 1
            if item.structure is None:
                skipped += 1
                log.debug("skipped %s: %s", item.origin, item.skipped)
                continue
            number = self.proposed_count + len(self._ahead)
            self._ahead.append(
                _Upcoming(number, Proposal(item.structure, origin=item.origin), block, index, skipped)
            )
        self._read = (block, index, skipped)
        return list(self._ahead)[:count]

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "htvs",
            "block": self.block,
            "index": self.index,
            "proposed": self.proposed_count,
            "skipped": self.skipped_count,
            "fingerprint": self.enumeration.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "htvs":
            raise ValueError(f"checkpointed search is {state.get('kind')!r}, not htvs")
        if state.get("fingerprint") != self.enumeration.fingerprint:
            raise SearchExhausted(
                "the templates, substitution rules or competing phases changed since this screen started "
                "(their enumeration differs); start a new run with --out"
            )
        self.block = int(state["block"])
        self.index = int(state["index"])
        self.proposed_count = int(state["proposed"])
        self.skipped_count = int(state["skipped"])
        self._ahead.clear()
        self._read = (self.block, self.index, self.skipped_count)
        self.prepared_ahead.clear()
