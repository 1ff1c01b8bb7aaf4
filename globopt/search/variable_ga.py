"""The steady-state GA over a whole chemical system: fitness is the energy above the running convex hull.

It is the fixed-composition GA (search/ga.py) with four things changed:

* **fitness**: a member's enthalpy per atom above the hull of everything relaxed so far
  (``globopt/hull/tracker.py``). The hull moves as results arrive, so fitness values are refreshed from it
  before every selection instead of being stored; the population stores enthalpies, which never change.
* **starts**: the elemental references and competing phases are proposed first (their relaxations are the
  hull's first end points), then the first generation of random structures spread over compositions
  (search/composition_sampling.py), and breeding starts only once every element has an end point.
* **operators**: heredity splices parents of different compositions, and transmutation, atom addition and
  removal move children between neighbouring compositions (search/composition_operators.py); the
  fixed-composition mutations act on a parent within its own composition and its limits.
* **population**: at most ``hull.max_per_composition`` members per composition (the best ones), so the
  population stays spread along the hull instead of filling up with polymorphs of one compound; niching as
  in the fixed-composition GA within a composition.

Operator probabilities adapt as in the fixed-composition GA; a child "pays off" when it enters the
population, and doubly so when it lands below the hull (a new stable phase or a better one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pymatgen.core import Structure

from globopt.candidate import Evaluation, Proposal, Status
from globopt.hull.space import CompositionSpace
from globopt.hull.tracker import HullTracker
from globopt.search.composition_operators import COMPOSITION_OPERATORS, VARIABLE_HEREDITY
from globopt.search.composition_sampling import CompositionSampler
from globopt.search.ga import LOGBOOK_KEPT, MAX_OPERATOR_TRIES, GeneticSearch, Member
from globopt.search.operators import IMMIGRANT_ATTEMPTS, VARIATION_OPERATORS, VariationOperator


class VariableCompositionGA(GeneticSearch):
    def __init__(
        self,
        space: CompositionSpace,
        tracker: HullTracker,
        starts: list[tuple[str, Structure]],
        seed: int,
        ga,
        random_config,
        max_per_composition: int,
        spread_temperature: float,
        initial_population=None,
    ) -> None:
        # the fixed-composition machinery (operator statistics, tournaments, DEAP random state) on one
        # content; random structures come from the per-content streams instead of its single stream
        first = space.content_dict(space.contents[0])
        super().__init__([first], space.envelope, seed, ga, [], random_config)
        self.space = space
        self.tracker = tracker
        self.max_per_composition = max_per_composition
        self.sampler = CompositionSampler(
            space, tracker, starts, seed, "ga-random", random_config, spread_temperature,
            attempts=MAX_OPERATOR_TRIES * IMMIGRANT_ATTEMPTS, check_limits=True,
        )  # fmt: skip
        self.random_stream = self.sampler.streams
        self.build_ahead = self.sampler.streams  # children are made on rank 0 here (composition moves)
        self.seeder = _generator_seeds(initial_population, self.initial_target, space, seed)
        self._fitness_version = -1

    def limits_for(self, structure: Structure):
        return self.space.limits_for(structure)

    def best_known_enthalpy(self, structure: Structure) -> float | None:
        return self.sampler.hull_enthalpy(structure)

    # -- proposing -----------------------------------------------------------------------------------
    def propose(self) -> Proposal:
        start = self.sampler.next_start()
        if start is not None:
            self.last_proposal = None
            return start
        if (
            self.initial_proposed < self.initial_target
            or len(self.population) < 2
            or not self.tracker.complete
        ):
            self.initial_proposed += 1
            if self.seeder is not None and (seeded := self.seeder.next()) is not None:
                _, structure, origin = seeded
                self._remember("generator", ())
                self.sampler.visit(structure)
                return Proposal(structure, origin=origin)
            return self._immigrant("init")
        for _ in range(MAX_OPERATOR_TRIES):
            name = str(self.rng.choice(self._operator_names, p=self.operator_probabilities()))
            if name == "immigrant":
                return self._immigrant("immigrant")
            made = self._apply(name)
            if made is not None:
                structure, parents = made
                self._remember(name, parents)
                self.sampler.visit(structure)
                return Proposal(structure, origin=f"ga:{name}", parents=parents)
        return self._immigrant("immigrant")

    def _apply(self, name: str) -> tuple[Structure, tuple[int, ...]] | None:
        if name in COMPOSITION_OPERATORS or name == "heredity":
            operator = COMPOSITION_OPERATORS.get(name, VARIABLE_HEREDITY)
        else:
            operator = VARIATION_OPERATORS[name]
        if isinstance(operator, VariationOperator):  # Wyckoff heredity pairs parents of one space group
            parents = self._parents_for(operator)
        else:
            parents = self._select(operator.n_parents)
        if len({p.candidate_id for p in parents}) < len(parents):
            return None  # a crossover of a member with itself
        structures = tuple(p.structure for p in parents)
        if operator is VARIABLE_HEREDITY or name in COMPOSITION_OPERATORS:
            child = operator.make(structures, self.space, self.rng, self.ga)
        else:  # a fixed-composition move, within the parent's own composition and limits
            counts = self.space.counts_of(structures[0])
            content = self.space.content_dict(counts)
            child = operator.make(
                structures, content, self.space.limits_for_counts(counts), self.rng, self.ga
            )
        return None if child is None else (child, tuple(p.candidate_id for p in parents))

    def _immigrant(self, label: str) -> Proposal:
        structure, group, screening = self.sampler.random_structure()
        self._remember("immigrant" if label == "immigrant" else "init", ())
        return Proposal(structure, origin=f"ga:{label}:sg{group}", screening=screening)

    def _select(self, k: int) -> list[Member]:
        self._refresh_fitness()
        return super()._select(k)

    # -- fitness ---------------------------------------------------------------------------------------
    def fitness(self, member: Member) -> float:
        """Enthalpy per atom above the current hull (the enthalpy itself while there is no hull yet)."""
        above = self.tracker.above_hull(member.structure.composition.reduced_formula, member.scores[0])
        return member.scores[0] if above is None else above

    def _refresh_fitness(self) -> None:
        if self._fitness_version == self.tracker.version:
            return
        for member in self.population:
            member.fitness = self._fitness_class((self.fitness(member),))
        self._fitness_version = self.tracker.version

    # -- learning ------------------------------------------------------------------------------------
    def tell(self, candidate_id: int, evaluation: Evaluation) -> None:
        operator = self.outstanding.pop(candidate_id, None)
        if operator and evaluation.status is not Status.SKIPPED:
            self._stats(operator)["judged"] += 1
        if evaluation.status is not Status.RELAXED or evaluation.relaxed is None:
            return
        below_hull = self.sampler.learn(evaluation)
        self.told += 1
        counts = self.space.counts_of(evaluation.relaxed)
        if counts is not None and self.space.allows(counts):  # a reference outside the space is hull-only
            member = Member(
                candidate_id,
                evaluation.relaxed,
                (evaluation.enthalpy_per_atom,),
                evaluation.spacegroup_number,
            )
            entered = self._insert(member, evaluation.duplicate_of, evaluation.supersedes)
            if operator and entered:
                self._stats(operator)["entered"] += 1
                if below_hull:
                    self._stats(operator)["new_best"] += 1
        if self.told % self.ga.population_size == 0:
            self._refresh_fitness()
            values = [member.fitness.values[0] for member in self.population] or [np.nan]
            self.logbook.append(
                {
                    "evaluations": self.told,
                    "min": float(np.min(values)),
                    "mean": float(np.mean(values)),
                    "max": float(np.max(values)),
                    "stable": len(self.tracker.stable()),
                }
            )
            del self.logbook[:-LOGBOOK_KEPT]

    def _insert(self, member: Member, duplicate_of: int | None, supersedes: int | None = None) -> bool:
        """Place a relaxed child: niches within a composition, at most ``max_per_composition`` members per
        composition, then the population's best by energy above the hull; True if it got in."""
        self._refresh_fitness()
        member.fitness = self._fitness_class((self.fitness(member),))
        formula = member.structure.composition.reduced_formula
        same_as = {i for i in (duplicate_of, supersedes) if i is not None}
        siblings = []
        for i, other in enumerate(self.population):
            if other.structure.composition.reduced_formula != formula:
                continue
            siblings.append(i)
            same_niche = (
                abs(other.scores[0] - member.scores[0]) < self.ga.niche_energy_tol
                and other.spacegroup == member.spacegroup
                and len(other.structure) == len(member.structure)
            )
            if other.candidate_id in same_as or same_niche:
                if member.scores < other.scores:
                    self.population[i] = member
                    return True
                return False
        if duplicate_of is not None:
            return False  # the same minimum was in the population once and was selected out
        if len(siblings) >= self.max_per_composition:
            worst = max(
                siblings, key=lambda i: (self.population[i].scores[0], self.population[i].candidate_id)
            )
            if member.scores[0] < self.population[worst].scores[0]:
                self.population[worst] = member
                return True
            return False
        self.population.append(member)
        # while an element has no end point there are no hull distances to rank by: keep everyone
        if len(self.population) > self.ga.population_size and self.tracker.complete:
            self.population.sort(key=lambda m: (m.fitness.values[0], m.candidate_id))
            self.population = self.population[: self.ga.population_size]
        return any(m is member for m in self.population)

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kind"] = "ga-hull"
        state["composition"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "ga-hull":
            raise ValueError(f"checkpointed search is {state.get('kind')!r}, not ga-hull")
        super().load_state_dict({**state, "kind": "ga"})
        self.sampler.load_state_dict(state["composition"])
        self._fitness_version = -1


def _generator_seeds(initial_population, first_generation: int, space: CompositionSpace, seed: int):
    """Generator seeding for the contents the checkpoint covers (elements it was trained on, cell sizes up
    to its largest training cell); None without a generator or when it covers none."""
    if initial_population is None or initial_population.generator is None or initial_population.fraction <= 0:
        return None
    import logging

    from generators.checkpoint import load_checkpoint, resolve_checkpoint
    from generators.seeding import GeneratorSeeds

    checkpoint = load_checkpoint(resolve_checkpoint(initial_population.generator))
    vocabulary = set(checkpoint.vocabulary)
    largest = int(checkpoint.dataset.get("max_atoms") or 10**6)
    covered = [
        space.content_dict(c)
        for c in space.contents
        if set(space.content_dict(c)) <= vocabulary and sum(c) <= largest
    ]
    # seeds go to compounds (the elemental references cover the end points), in a seeded random order:
    # the seeder takes contents in turn, and the space lists them by size
    compounds = [c for c in covered if len(c) > 1]
    covered = compounds or covered
    order = np.random.default_rng([seed, len(covered)]).permutation(len(covered))
    covered = [covered[i] for i in order]
    log = logging.getLogger("globopt.generators")
    if not covered:
        log.warning(
            "initial_population.generator %s covers no cell content of the chemical system (its elements: "
            "%s); the first generation is drawn with pyxtal",
            initial_population.generator, " ".join(sorted(vocabulary)),
        )  # fmt: skip
        return None
    log.info("generator seeding: %d of %d cell contents covered", len(covered), len(space.contents))
    return GeneratorSeeds(
        initial_population.generator, initial_population.fraction, first_generation, covered, space.envelope,
        seed, initial_population.sampling_steps,
    )  # fmt: skip
