"""Where a variable-composition search spends its random structures: the composition-spreading rule, the
numbered random streams per cell content, and what both variable-composition searches share.

The spreading rule. Drawing a random cell content uniformly (what a fixed-composition search does over
formula units) piles effort onto compositions with many cell sizes (AB at 2, 4, 6 and 8 atoms against
A3B5 at 8 only) and onto whatever the random generator happens to favour. Instead:

1. *coverage first*: while some composition of the space has had no proposal at all, the next random
   structure goes to one of those (drawn uniformly), so every composition is tried once early;
2. then composition ``c`` is drawn with weight ``exp(-d_c / T) / (1 + n_c)``: ``n_c`` proposals made there
   so far (random structures, children and starts alike), ``d_c`` how far the best structure found there
   lies above the current hull (0 before a hull exists), ``T`` = ``hull.spread_temperature``.

``1 / (1 + n_c)`` evens out the effort, so no composition is starved by bad luck and none is hammered
(tiny cells whose few structures repeat count their duplicates as visits and fade out by themselves);
``exp(-d / T)`` moves effort toward compositions whose best is near the hull, where one more good structure
can make a new stable phase, without ever dropping a composition (0.1 eV/atom above the hull still gets
about a third of an untried composition's weight at the default T). The cell size is then drawn uniformly
among the sizes the composition allows.

Each cell content has its own numbered stream (search/random_stream.py), seeded from (run seed, content),
so structure ``k`` of a content is the same wherever it is built; the search state holds each stream's next
number. Workers build ahead for the contents the rule currently weighs highest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from pymatgen.core import Structure

from globopt.candidate import Evaluation, Proposal, Screening, Status
from globopt.geometry import geometry_problem
from globopt.hull.space import CompositionSpace, Counts
from globopt.hull.starts import entries_fingerprint
from globopt.hull.tracker import HullTracker
from globopt.search.base import SearchExhausted
from globopt.search.random_stream import GeneratedStructure, RandomRecipe, RandomStream

# numbered structures of a content tried before the next draw of the rule (pyxtal occasionally fails)
MAX_STREAM_FAILURES = 5
# salt in the per-content stream seeds, so they differ from every other stream of the run
STREAM_SALT = 0x68756C6C


class CompositionChooser:
    """The composition-spreading rule (module docstring)."""

    def __init__(self, space: CompositionSpace, tracker: HullTracker, temperature: float) -> None:
        self.space = space
        self.tracker = tracker
        self.temperature = temperature
        self.visits: dict[str, int] = {}

    def visit(self, formula: str) -> None:
        self.visits[formula] = self.visits.get(formula, 0) + 1

    def weights(self) -> np.ndarray:
        """Relative chance of each composition of the space (in ``space.compositions`` order)."""
        compositions = self.space.compositions
        untried = np.array([self.visits.get(f, 0) == 0 for f in compositions])
        if untried.any():
            return untried / untried.sum()
        weights = np.array(
            [
                math.exp(-self.tracker.distance(f) / self.temperature) / (1 + self.visits.get(f, 0))
                for f in compositions
            ]
        )
        return weights / weights.sum()

    def choose(self, rng: np.random.Generator) -> Counts:
        """A cell content: composition by the rule, then one of its cell sizes uniformly."""
        formula = self.space.compositions[int(rng.choice(len(self.space.compositions), p=self.weights()))]
        contents = self.space.contents_of(formula)
        return contents[int(rng.integers(len(contents)))]

    def likely(self) -> list[Counts]:
        """Contents in the order the rule is most likely to draw them next (for building ahead)."""
        weights = self.weights()
        order = np.argsort(-weights, kind="stable")
        return [
            c for i in order if weights[i] > 0 for c in self.space.contents_of(self.space.compositions[i])
        ]


def stream_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, STREAM_SALT, index]).generate_state(1, np.uint64)[0] >> 1)


class StreamSet:
    """One numbered random stream per cell content, created when first needed, behind the interface the
    engine and ``SearchAlgorithm`` use for a search's single stream (requests, deliveries, counts)."""

    def __init__(
        self,
        name: str,
        seed: int,
        space: CompositionSpace,
        spacegroups: list[int] | None,
        volume_factor: float,
        attempts: int,
        check_limits: bool,
        prior: str,
        forecast: Callable[[], list[Counts]],
    ) -> None:
        self.name = name
        self.seed = seed
        self.space = space
        self.spacegroups = spacegroups
        self.volume_factor = volume_factor
        self.attempts = attempts
        self.check_limits = check_limits
        self.prior = prior
        self.forecast = forecast
        self.streams: dict[Counts, RandomStream] = {}
        self._by_seed: dict[int, RandomStream] = {}

    def stream(self, counts: Counts) -> RandomStream:
        if counts not in self.streams:
            # the envelope limits, which every worker has: a structure is then the same wherever it is built
            seed = stream_seed(self.seed, self.space.index(counts))
            stream = RandomStream(
                self.name, seed, [self.space.content_dict(counts)], self.spacegroups, self.volume_factor,
                self.attempts, limits=self.space.envelope, check_limits=self.check_limits, prior=self.prior,
            )  # fmt: skip
            self.streams[counts] = stream
            self._by_seed[stream.seed] = stream
        return self.streams[counts]

    def next(self, counts: Counts) -> GeneratedStructure:
        return self.stream(counts).next()

    # -- what the engine reads and calls --------------------------------------------------------------
    @property
    def next_index(self) -> int:
        """Structures consumed over all contents (the engine's estimate of how many to build ahead)."""
        return sum(s.next_index for s in self.streams.values())

    @property
    def built_here(self) -> int:
        return sum(s.built_here for s in self.streams.values())

    @property
    def built_elsewhere(self) -> int:
        return sum(s.built_elsewhere for s in self.streams.values())

    def requests(self, count: int, lookahead: int) -> list[RandomRecipe]:
        """The next unbuilt number of each of the likeliest contents, up to ``count`` recipes."""
        wanted: list[RandomRecipe] = []
        for counts in self.forecast():
            if len(wanted) >= count:
                break
            wanted += self.stream(counts).requests(1, max(1, min(lookahead, 2)))
        return wanted

    def owns(self, recipe: RandomRecipe) -> bool:
        return recipe.stream == self.name and recipe.seed in self._by_seed

    def deliver(self, items: Iterable[GeneratedStructure]) -> None:
        for item in items:
            self._by_seed[item.recipe.seed].deliver([item])

    def lost(self, recipes: Iterable[RandomRecipe]) -> None:
        for recipe in recipes:
            if recipe.seed in self._by_seed:
                self._by_seed[recipe.seed].lost([recipe])

    def restart_at(self, index: int) -> None:
        """The single-stream resume hook: per-content positions are restored by ``load_state_dict``."""

    def state_dict(self) -> dict[str, int]:
        return {str(self.space.index(c)): s.next_index for c, s in self.streams.items() if s.next_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.streams.clear()
        self._by_seed.clear()
        for index, position in state.items():
            self.stream(self.space.contents[int(index)]).restart_at(int(position))


class CompositionSampler:
    """What both variable-composition searches share: the fixed starts (elemental references, competing
    phases), the running hull, the spreading rule and the per-content random streams, with one checkpointed
    generator for the rule's draws."""

    def __init__(
        self,
        space: CompositionSpace,
        tracker: HullTracker,
        starts: list[tuple[str, Structure]],
        seed: int,
        stream_name: str,
        random_config: Any,
        temperature: float,
        attempts: int,
        check_limits: bool,
    ) -> None:
        self.space = space
        self.tracker = tracker
        self.starts = starts
        self.starts_proposed = 0
        self.rng = np.random.default_rng([seed, STREAM_SALT])
        self.chooser = CompositionChooser(space, tracker, temperature)
        self.streams = StreamSet(
            stream_name, seed, space, random_config.spacegroups, random_config.volume_factor, attempts,
            check_limits, random_config.spacegroup_prior, self.chooser.likely,
        )  # fmt: skip

    def next_start(self) -> Proposal | None:
        """The next elemental reference or competing phase, until all have been proposed."""
        if self.starts_proposed >= len(self.starts):
            return None
        origin, structure = self.starts[self.starts_proposed]
        self.starts_proposed += 1
        self.visit(structure)
        return Proposal(structure.copy(), origin=origin)

    def visit(self, structure: Structure) -> None:
        """Count a proposal at its composition (the rule's n_c)."""
        counts = self.space.counts_of(structure)
        if counts is not None:
            self.chooser.visit(self.space.formula(counts))

    def random_structure(self) -> tuple[Structure, int, Screening | None]:
        """A random symmetric structure at a content the rule chose: (structure, space group, screening)."""
        error = ""
        for _ in range(MAX_STREAM_FAILURES):
            counts = self.chooser.choose(self.rng)
            made = self.streams.next(counts)
            if made.structure is None:
                error = made.error
                continue
            self.visit(made.structure)
            return made.structure, made.spacegroup, self._screening(made, counts)
        raise SearchExhausted(f"pyxtal could not build random structures: {error}")

    def _screening(self, made: GeneratedStructure, counts: Counts) -> Screening | None:
        """A worker checked the structure against the envelope limits; the screen checks each composition
        against its own, so the verdict is taken again here (a few hundred microseconds), exactly as rank 0
        would reach it for a structure it built itself."""
        prepared = made.screening
        if prepared is None:
            return None
        problem = geometry_problem(made.structure, self.space.limits_for_counts(counts))
        if problem:
            return Screening(problem, None, None, structure_json=prepared.structure_json)
        return None if prepared.geometry_problem else prepared

    def learn(self, evaluation: Evaluation) -> bool:
        """Put a relaxed structure on the hull; True when the hull changed."""
        if evaluation.status is not Status.RELAXED or evaluation.relaxed is None:
            return False
        counts = self.space.counts_of(evaluation.relaxed)
        if counts is None:
            return False
        return self.tracker.add(
            self.space.formula(counts), evaluation.enthalpy_per_atom, evaluation.candidate_id
        )

    def hull_enthalpy(self, structure: Structure) -> float | None:
        """The hull's enthalpy per atom at the structure's composition (None while there is no hull)."""
        counts = self.space.counts_of(structure)
        if counts is None or not self.tracker.complete:
            return None
        return self.tracker.hull_energy(self.space.formula(counts))

    def state_dict(self) -> dict[str, Any]:
        return {
            "given": entries_fingerprint(self.tracker.given),
            "rng": self.rng.bit_generator.state,
            "starts_proposed": self.starts_proposed,
            "visits": self.chooser.visits,
            "streams": self.streams.state_dict(),
            "hull": self.tracker.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        given = entries_fingerprint(self.tracker.given)
        if state.get("given", given) != given:  # a state without it predates the check
            raise SearchExhausted(
                "the entries of the hull.competing_phases JSON files changed since this run started (the "
                "hull the search steered by would change under it); restore them or start a new run (--out)"
            )
        self.rng.bit_generator.state = state["rng"]
        self.starts_proposed = int(state["starts_proposed"])
        self.chooser.visits = {f: int(n) for f, n in state["visits"].items()}
        self.streams.load_state_dict(state["streams"])
        self.tracker.load_state_dict(state["hull"])
