"""Random symmetric search over a whole chemical system (AIRSS-style, variable composition).

The elemental references and competing phases are proposed first; after them every proposal is a random
symmetric structure at a cell content chosen by the composition-spreading rule
(search/composition_sampling.py). The search learns nothing about structures, only where the hull is, and
that only steers which compositions get the next random structures.
"""

from __future__ import annotations

from typing import Any

from pymatgen.core import Structure

from globopt.candidate import Evaluation, Proposal
from globopt.hull.space import CompositionSpace
from globopt.hull.tracker import HullTracker
from globopt.search.base import SearchAlgorithm
from globopt.search.composition_sampling import CompositionSampler
from globopt.search.random_search import MAX_GENERATION_ATTEMPTS


class VariableCompositionRandom(SearchAlgorithm):
    def __init__(
        self,
        space: CompositionSpace,
        tracker: HullTracker,
        starts: list[tuple[str, Structure]],
        seed: int,
        random_config,
        spread_temperature: float,
    ) -> None:
        self.space = space
        self.tracker = tracker
        self.limits = space.envelope  # the relaxation's guards; each proposal is checked by limits_for
        self.sampler = CompositionSampler(
            space, tracker, starts, seed, "random", random_config, spread_temperature,
            attempts=MAX_GENERATION_ATTEMPTS, check_limits=False,
        )  # fmt: skip
        self.build_ahead = self.sampler.streams
        self.proposed_count = 0

    def limits_for(self, structure: Structure):
        return self.space.limits_for(structure)

    def best_known_enthalpy(self, structure: Structure) -> float | None:
        return self.sampler.hull_enthalpy(structure)

    def propose(self) -> Proposal:
        self.proposed_count += 1
        start = self.sampler.next_start()
        if start is not None:
            return start
        structure, group, screening = self.sampler.random_structure()
        return Proposal(structure, origin=f"random:sg{group}", screening=screening)

    def tell(self, candidate_id: int, evaluation: Evaluation) -> None:
        self.sampler.learn(evaluation)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "random-hull",
            "proposed": self.proposed_count,
            "composition": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "random-hull":
            raise ValueError(f"checkpointed search is {state.get('kind')!r}, not random-hull")
        self.proposed_count = int(state["proposed"])
        self.sampler.load_state_dict(state["composition"])
