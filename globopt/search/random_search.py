"""Random symmetric structure search (AIRSS-style sampling with pyxtal).

Space groups compatible with the composition are drawn uniformly and pyxtal places the atoms on
Wyckoff positions. Symmetric random cells relax to low-energy minima far more often than unconstrained
random cells, which is why this is the baseline every smarter search must beat.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pyxtal import pyxtal
from pyxtal.symmetry import Group

from globopt.candidate import Proposal
from globopt.search.base import SearchAlgorithm, SearchExhausted

# pyxtal occasionally cannot fill a chosen group in its few internal attempts; try other groups this
# many times before concluding the composition is impossible to build.
MAX_GENERATION_ATTEMPTS = 200


def compatible_spacegroups(counts: list[int], allowed: list[int] | None = None) -> list[int]:
    """Space groups whose Wyckoff multiplicities can hold exactly these atom counts."""
    groups = allowed or range(1, 231)
    return [g for g in groups if Group(g).check_compatible(counts)[0]]


class RandomSymmetricSearch(SearchAlgorithm):
    def __init__(
        self,
        composition: dict[str, int],
        seed: int,
        spacegroups: list[int] | None = None,
        volume_factor: float = 1.1,
    ) -> None:
        self.species = list(composition)
        self.counts = [composition[el] for el in self.species]
        self.volume_factor = volume_factor
        self.rng = np.random.default_rng(seed)
        self.spacegroups = compatible_spacegroups(self.counts, spacegroups)
        if not self.spacegroups:
            where = f"among {spacegroups}" if spacegroups else "at all"
            raise SearchExhausted(f"no space group {where} can hold the composition {dict(composition)}")
        self.proposed = 0

    def propose(self) -> Proposal:
        last_error = ""
        for _ in range(MAX_GENERATION_ATTEMPTS):
            group = int(self.rng.choice(self.spacegroups))
            crystal = pyxtal()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    crystal.from_random(
                        3, group, self.species, self.counts, factor=self.volume_factor, random_state=self.rng
                    )
            except Exception as exc:  # pyxtal signals failure to place atoms with several exception types
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if not crystal.valid:
                continue
            self.proposed += 1
            return Proposal(crystal.to_pymatgen(), origin=f"random:sg{group}")
        raise SearchExhausted(f"pyxtal failed {MAX_GENERATION_ATTEMPTS} times in a row (last: {last_error})")

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random", "rng": self.rng.bit_generator.state, "proposed": self.proposed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "random":
            raise ValueError(f"checkpointed search is {state.get('kind')!r}, not random")
        self.rng.bit_generator.state = state["rng"]
        self.proposed = int(state["proposed"])
