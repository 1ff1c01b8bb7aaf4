"""Random symmetric structure search (AIRSS-style sampling with pyxtal).

Space groups compatible with the composition are drawn uniformly and pyxtal places the atoms on
Wyckoff positions. Symmetric random cells relax to low-energy minima far more often than unconstrained
random cells, which is why this is the baseline every smarter search must beat.
"""

from __future__ import annotations

from typing import Any

from globopt.candidate import Proposal
from globopt.geometry import GeometryLimits
from globopt.search.base import SearchAlgorithm, SearchExhausted
from globopt.search.pyxtal_sampling import compatible_spacegroups
from globopt.search.random_stream import RandomStream

# pyxtal occasionally cannot fill a chosen group in its few internal attempts; try other groups this
# many times before concluding the composition is impossible to build.
MAX_GENERATION_ATTEMPTS = 200


class RandomSymmetricSearch(SearchAlgorithm):
    def __init__(
        self,
        contents: list[dict[str, int]],
        seed: int,
        spacegroups: list[int] | None = None,
        volume_factor: float = 1.1,
        limits: GeometryLimits | None = None,
        spacegroup_prior: str = "uniform",
    ) -> None:
        """``contents``: every cell content allowed (several with a formula-unit range), drawn uniformly.

        ``limits``: the geometry limits proposals are checked against (the pyxtal draws do not use them)."""
        if limits is not None:
            self.limits = limits
        buildable = [c for c in contents if compatible_spacegroups(list(c.values()), spacegroups)]
        if not buildable:
            where = f"among {spacegroups}" if spacegroups else "at all"
            raise SearchExhausted(f"no space group {where} can hold the cell content(s) {contents}")
        self.random_stream = RandomStream(
            "random", seed, buildable, spacegroups, volume_factor, attempts=MAX_GENERATION_ATTEMPTS,
            prior=spacegroup_prior,
        )  # fmt: skip
        self.build_ahead = self.random_stream
        self.proposed_count = 0

    def propose(self) -> Proposal:
        made = self.random_stream.next()
        if made.structure is None:
            index = made.recipe.index
            raise SearchExhausted(f"pyxtal could not build random structure {index}: {made.error}")
        self.proposed_count += 1
        return Proposal(made.structure, origin=f"random:sg{made.spacegroup}", screening=made.screening)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random", "next": self.random_stream.next_index, "proposed": self.proposed_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "random":
            raise ValueError(f"checkpointed search is {state.get('kind')!r}, not random")
        self.proposed_count = int(state["proposed"])
        self.random_stream.restart_at(int(state.get("next", self.proposed_count)))
