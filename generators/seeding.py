"""Seeding a search's first generation with structures from a trained generator.

The structures are generated once, on the first request, from the run seed, checked with the same
validity test every GA operator's child must pass (content, lattice shape, volume window, closest
distances: ``globopt.search.cells.validity_problem``), and kept as JSON in the search state. A resumed
search therefore replays exactly the same seeds without running the model again, and a seed the model
could not make valid is replaced by the search's usual pyxtal structure.
"""

from __future__ import annotations

import logging
from typing import Any

from pymatgen.core import Structure

from globopt.geometry import GeometryLimits
from globopt.structure_codec import structure_from_dict, structure_to_dict

log = logging.getLogger("globopt.generators")
OVERSAMPLE = 2  # structures drawn per wanted seed; the invalid ones are dropped


class GeneratorSeeds:
    def __init__(
        self,
        checkpoint: str,
        fraction: float,
        first_generation: int,
        contents: list[dict[str, int]],
        limits: GeometryLimits,
        seed: int,
        sampling_steps: int | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.wanted = round(fraction * first_generation)
        self.contents = [dict(c) for c in contents]
        self.limits = limits
        self.seed = seed
        self.sampling_steps = sampling_steps
        self.kind = ""
        self.seeds: list[tuple[int, dict[str, Any]]] | None = None  # (content index, structure dict)
        self.used = 0

    def next(self) -> tuple[int, Structure, str] | None:
        """(content index, structure, origin) of the next seed, or None when the seeds are used up."""
        if self.used >= self.wanted:
            return None
        if self.seeds is None:
            self.seeds = self._generate()
        if self.used >= len(self.seeds):
            self.used += 1  # counts toward the share: the search falls back to pyxtal for this one
            return None
        content_index, structure = self.seeds[self.used]
        self.used += 1
        return content_index, structure_from_dict(structure), f"generator:{self.kind}"

    def _generate(self) -> list[tuple[int, dict[str, Any]]]:
        from generators.checkpoint import CheckpointError
        from generators.sample import StructureGenerator
        from globopt.search.base import SearchExhausted
        from globopt.search.cells import validity_problem

        try:
            generator = StructureGenerator(self.checkpoint)
        except CheckpointError as exc:
            raise SearchExhausted(f"initial_population.generator: {exc}") from None
        self.kind = generator.kind
        order = [i % len(self.contents) for i in range(OVERSAMPLE * self.wanted)]
        species = [[el for el, n in self.contents[i].items() for _ in range(n)] for i in order]
        structures = generator.generate(species, seed=self.seed, steps=self.sampling_steps)
        valid: list[tuple[int, dict[str, Any]]] = []
        problems: dict[str, int] = {}
        for content_index, structure in zip(order, structures, strict=True):
            try:
                problem = validity_problem(structure, self.contents[content_index], self.limits)
            except Exception as exc:  # a degenerate generated lattice can break the geometry code
                problem = f"invalid lattice ({type(exc).__name__})"
            if problem:
                key = problem.split(" ")[0]
                problems[key] = problems.get(key, 0) + 1
            elif len(valid) < self.wanted:
                valid.append((content_index, structure_to_dict(structure)))
        log.info(
            "generator %s: %d of %d sampled structures passed the sanity checks (%d wanted)%s",
            self.checkpoint, len(structures) - sum(problems.values()), len(structures), self.wanted,
            f"; rejected: {problems}" if problems else "",
        )  # fmt: skip
        return valid

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seeds": self.seeds, "used": self.used, "wanted": self.wanted}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.kind = state["kind"]
        self.seeds = None if state["seeds"] is None else [(int(i), s) for i, s in state["seeds"]]
        self.used = int(state["used"])
        self.wanted = int(state["wanted"])


def seeds_from_config(
    initial_population, first_generation: int, contents, limits: GeometryLimits, seed: int
) -> GeneratorSeeds | None:
    """The seeder a config's ``initial_population`` asks for, or None without a generator."""
    if initial_population is None or initial_population.generator is None:
        return None
    if initial_population.fraction <= 0:
        return None
    return GeneratorSeeds(
        initial_population.generator, initial_population.fraction, first_generation, contents, limits,
        seed, initial_population.sampling_steps,
    )  # fmt: skip
