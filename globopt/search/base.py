"""The contract between the engine and a search algorithm."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from globopt.candidate import Evaluation, Proposal

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from globopt.geometry import GeometryLimits
    from globopt.search.random_stream import GeneratedStructure


class SearchAlgorithm(ABC):
    """Proposes structures one at a time and is told the outcome of each.

    Asynchronous by construction: the engine asks for a proposal whenever a worker is free and reports
    results in whatever order they finish. The algorithm's whole state must round-trip through
    ``state_dict``/``load_state_dict`` as plain JSON, because the engine stores it in the same
    transaction as the archive rows; a resumed search continues the same search.
    """

    # Geometry limits of the cells this search proposes: the relaxation's guards use them, and so does the
    # check of every proposal unless ``limits_for`` is more specific (a screen over many compositions).
    limits: GeometryLimits
    # A finite search (an enumeration) ends the run normally when it runs out; others treat running out
    # of proposals as an error.
    finite: bool = False

    @property
    def size_hint(self) -> int | None:
        """How many proposals a finite search makes at most (the progress display's total), else None."""
        return None

    def limits_for(self, structure: Structure) -> GeometryLimits:
        """The limits a proposal is checked against before it is relaxed."""
        return self.limits

    def best_known_enthalpy(self, structure: Structure) -> float | None:
        """The enthalpy per atom a relaxation of ``structure`` is judged against (early stop, step
        extension); None: the lowest of the run. A search over many compositions answers with the hull at
        the structure's composition, since the run's lowest enthalpy per atom belongs to another one."""
        return None

    @abstractmethod
    def propose(self) -> Proposal:
        """Next structure to evaluate. Raise SearchExhausted if no more can be produced."""

    def proposed(self, candidate_id: int) -> None:  # noqa: B027 - optional hook
        """The engine stored the last proposal under this id (called right after ``propose``)."""

    def tell(self, candidate_id: int, evaluation: Evaluation) -> None:  # noqa: B027 - optional hook
        """Learn from a finished evaluation (random search ignores it)."""

    # Structures this search will propose next that workers can build or prepare ahead of time (random
    # structures, GA children, a screen's next cells); None for searches that make every proposal from
    # their own state.
    build_ahead: BuildAhead | None = None

    def generation_requests(self, count: int, lookahead: int) -> list[Any]:
        """Recipes of structures that are not being built yet (the engine ships them to workers)."""
        return [] if self.build_ahead is None else self.build_ahead.requests(count, lookahead)

    def deliver_generated(self, items: list[GeneratedStructure]) -> None:
        if self.build_ahead is not None:
            self.build_ahead.deliver(i for i in items if self.build_ahead.owns(i.recipe))

    def generation_lost(self, recipes: list[Any]) -> None:
        if self.build_ahead is not None:
            self.build_ahead.lost(recipes)

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BuildAhead(Protocol):
    """Upcoming proposals that workers build or prepare (search/random_stream.py has the mechanism).

    A recipe is anything with ``build(limits)`` and ``screening_limits(limits)``; what comes back is a
    cache the search may use when the proposal's turn comes, never search state.
    """

    next_index: int  # proposals taken from it so far: the engine's measure of how many a relaxation uses
    built_here: int  # taken without a worker's build having arrived
    built_elsewhere: int

    def requests(self, count: int, lookahead: int) -> list[Any]: ...

    def owns(self, recipe: Any) -> bool: ...

    def deliver(self, items: Iterable[GeneratedStructure]) -> None: ...

    def lost(self, recipes: Iterable[Any]) -> None: ...


class SearchExhausted(RuntimeError):
    """The algorithm cannot produce further candidates (e.g. no compatible space group)."""
