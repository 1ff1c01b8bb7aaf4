"""HTVS as a search algorithm: the engine asks for proposals, the enumeration streams them.

The whole state is a cursor into the enumeration plus counters, stored by the engine in the same SQLite
transaction as each candidate row. After a kill, the engine re-issues the pending rows and this search
continues after the last stored proposal: every enumerated structure is evaluated exactly once.
"""

from __future__ import annotations

import logging
from typing import Any

from pymatgen.core import Structure

from globopt.candidate import Proposal
from globopt.geometry import GeometryLimits
from globopt.htvs.enumeration import Enumeration
from globopt.htvs.limits import composition_limits, envelope_limits
from globopt.search.base import SearchAlgorithm, SearchExhausted

log = logging.getLogger("globopt")


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
        blocks = self.enumeration.blocks
        while True:
            if self.stop_after is not None and self.proposed_count >= self.stop_after:
                raise SearchExhausted(f"htvs.stop_after={self.stop_after} structures proposed")
            while self.block < len(blocks) and self.index >= len(blocks[self.block]):
                self.block += 1
                self.index = 0
            if self.block >= len(blocks):
                raise SearchExhausted(
                    f"screen enumerated: {self.proposed_count} structures proposed, "
                    f"{self.skipped_count} substitutions skipped by filters"
                )
            item = self.enumeration.item(self.block, self.index)
            self.index += 1
            if item.structure is None:
                self.skipped_count += 1
                log.debug("skipped %s: %s", item.origin, item.skipped)
                continue
            self.proposed_count += 1
            return Proposal(item.structure, origin=item.origin)

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
