"""Steady-state evolutionary crystal search on DEAP.

The population is a list of relaxed, mutually distinct structures. Whenever a worker is free the
engine asks for one child: a tournament (DEAP) picks parents, one crystal operator (search/operators.py)
makes the child, and when its relaxation returns it competes for a place in the population. There are
no generations, so no worker ever waits for a slow relaxation of someone else's candidate. With workers
in other processes, the next children are planned a little ahead and built by the workers
(search/ga_children.py).

Niching keeps the population diverse: a child that relaxes into the same minimum as a member (the
engine's StructureMatcher verdict, or equal energy within ``niche_energy_tol`` and the same space group)
can only replace that member, never take a second place. With extra objectives, survivor selection and
parent tournaments use NSGA-II ranks and crowding distances (DEAP), and the run's result is a Pareto front.

DEAP draws its random numbers from Python's ``random`` module; the search keeps its own state for it and
swaps it in around every DEAP call, so a checkpointed search resumes bit-for-bit.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from deap import base, tools
from pymatgen.core import Structure

from generators.seeding import seeds_from_config
from globopt.candidate import Evaluation, Proposal, Screening, Status
from globopt.geometry import GeometryLimits
from globopt.objectives import objective_scores
from globopt.search.base import SearchAlgorithm
from globopt.search.ga_children import ChildPlans, GeneticBuildAhead, PlannedChild
from globopt.search.operators import (
    IMMIGRANT_ATTEMPTS,
    VARIATION_OPERATORS,
    VariationOperator,
    parent_content,
)
from globopt.search.random_stream import RandomStream
from globopt.state_json import PreEncodedList
from globopt.structure_codec import structure_from_dict, structure_to_dict

# Operators may fail to make a valid child (e.g. heredity with nothing to splice); try this many draws.
MAX_OPERATOR_TRIES = 12
# Share of the configured operator probabilities kept fixed when they adapt to measured success.
ADAPTIVE_FLOOR = 0.3
# A member whose minimum children have relaxed back into this many times loses parent tournaments to any
# member that has not (its neighbourhood is mined out); it stays in the population and can still win
# against other exhausted members.
EXHAUSTED_AFTER = 3
HALL_OF_FAME_SIZE = 10
# Population statistics records kept (one per population_size results): the search state is written with
# every proposal, so an unbounded record would make each proposal cost more the longer the run goes
# (at 20,000 evaluations it was three times the rest of the state).
LOGBOOK_KEPT = 100


@dataclass
class Member:
    """One population member, shaped for DEAP: selection reads ``fitness``."""

    candidate_id: int
    structure: Structure
    scores: tuple  # (enthalpy per atom, objective scores...), all minimised
    spacegroup: int | None
    fitness: base.Fitness | None = None
    # the search state is serialised after every proposal and result; members never change, so their
    # structures are converted to dicts once
    structure_dict: dict | None = None
    # children that relaxed back into this member's minimum: a member re-found this often is mined out
    refound: int = 0

    def as_state(self) -> dict[str, Any]:
        if self.structure_dict is None:
            self.structure_dict = structure_to_dict(self.structure)
        return {
            "id": self.candidate_id,
            "structure": self.structure_dict,
            "scores": list(self.scores),
            "sg": self.spacegroup,
            "refound": self.refound,
        }

    @property
    def exhausted(self) -> bool:
        return self.refound >= EXHAUSTED_AFTER


class GeneticSearch(SearchAlgorithm):
    def __init__(
        self,
        contents,
        limits: GeometryLimits,
        seed: int,
        ga,
        objectives,
        random_config,
        initial_population=None,
    ) -> None:
        self.contents = [dict(c) for c in contents]
        self.limits = limits
        self.ga = ga
        self.objectives = list(objectives)
        self.spacegroups = random_config.spacegroups
        self.volume_factor = random_config.volume_factor
        self.rng = np.random.default_rng(seed)
        self._py_random_state = random.Random(seed).getstate()
        self._fitness_class = type(
            "CrystalFitness", (base.Fitness,), {"weights": (-1.0,) * (1 + len(self.objectives))}
        )
        names = list(ga.operators)
        weights = np.array([ga.operators[n] for n in names], dtype=float)
        self._operator_names, self._operator_p = names, weights / weights.sum()
        self.population: list[Member] = []
        self._encoded: dict[str, tuple[Any, PreEncodedList]] = {}  # see _encoded_once
        self.hall_of_fame: list[dict[str, Any]] = []
        self.initial_target = ga.initial_random or ga.population_size
        # share of the first generation drawn from a trained generative model (generators/seeding.py)
        self.seeder = seeds_from_config(initial_population, self.initial_target, self.contents, limits, seed)
        # random structures (first generation, immigrants) are numbered so workers can build them ahead
        self.random_stream = RandomStream(
            "ga-random", seed, self.contents, self.spacegroups, self.volume_factor,
            attempts=MAX_OPERATOR_TRIES * IMMIGRANT_ATTEMPTS, limits=limits, check_limits=True,
            prior=random_config.spacegroup_prior,
        )  # fmt: skip
        # children planned ahead for workers to build (search/ga_children.py; only when the engine asks)
        self.children = ChildPlans(seed, limits, ga)
        self.build_ahead = GeneticBuildAhead(self)
        self.initial_proposed = 0
        self.told = 0
        self.last_proposal: tuple[str, tuple[int, ...]] | None = None
        self.outstanding: dict[int, str] = {}  # candidate id -> operator that made it
        self.operator_stats: dict[str, dict[str, int]] = {}
        self.logbook: list[dict[str, float]] = []
        self._statistics = tools.Statistics(key=lambda member: member.scores[0])
        for name, func in (("min", np.min), ("mean", np.mean), ("max", np.max)):
            self._statistics.register(name, func)

    # -- proposing -----------------------------------------------------------------------------------
    def propose(self) -> Proposal:
        if self.initial_proposed < self.initial_target or len(self.population) < 2:
            self.initial_proposed += 1
            if self.seeder is not None and (seeded := self.seeder.next()) is not None:
                _, structure, origin = seeded
                self._remember("generator", ())
                return Proposal(structure, origin=origin)
            return self._immigrant("init")
        for _ in range(MAX_OPERATOR_TRIES):
            plan = self.children.take()
            if plan is None:  # nothing planned ahead (always so in-process): draw and make it here
                name = self._draw_operator()
                made = self._apply(name)
            else:
                name = plan.operator
                made = self._planned(plan)
            if made is not None:
                structure, parents, screening = made
                self._remember(name, parents)
                return Proposal(structure, origin=f"ga:{name}", parents=parents, screening=screening)
        return self._immigrant("immigrant")

    def _draw_operator(self) -> str:
        return str(self.rng.choice(self._operator_names, p=self.operator_probabilities()))

    def _apply(self, name: str) -> tuple[Structure, tuple[int, ...], Screening | None] | None:
        operator = VARIATION_OPERATORS[name]
        if operator.make is None:  # a fresh structure from the numbered random stream
            return self._random_structure()
        parents = self._parents_for(operator)
        if len({p.candidate_id for p in parents}) < len(parents):
            return None  # a crossover of a member with itself
        content = parent_content(parents[0].structure)
        child = operator.make(tuple(p.structure for p in parents), content, self.limits, self.rng, self.ga)
        return None if child is None else (child, tuple(p.candidate_id for p in parents), None)

    def _planned(self, plan: PlannedChild) -> tuple[Structure, tuple[int, ...], Screening | None] | None:
        if plan.is_immigrant:
            return self._random_structure()
        if not plan.makes_child:
            return None  # a crossover of a member with itself
        child, screening = self.children.build(plan)
        return None if child is None else (child, plan.parent_ids, screening)

    def immigrant_share(self) -> float:
        """Probability that an operator draw yields a fresh random structure rather than a child."""
        fresh = [VARIATION_OPERATORS[name].make is None for name in self._operator_names]
        return float(self.operator_probabilities()[fresh].sum())

    def plans_children(self) -> bool:
        """Whether the next proposals are children (the first generation is drawn, not bred)."""
        return self.initial_proposed >= self.initial_target and len(self.population) >= 2

    def plan_children(self, count: int, depth: int) -> None:
        """Decide up to ``count`` more children now, keeping at most ``depth`` planned (ga_children.py)."""
        for _ in range(min(count, depth - len(self.children.planned))):
            name = self._draw_operator()
            operator = VARIATION_OPERATORS[name]
            parents = () if operator.make is None else tuple(self._parents_for(operator))
            self.children.add(name, parents)

    def _immigrant(self, label: str) -> Proposal:
        made = self.random_stream.next()
        if made.structure is None:
            from globopt.search.base import SearchExhausted

            raise SearchExhausted(f"pyxtal could not build a random structure: {made.error}")
        self._remember("immigrant" if label == "immigrant" else "init", ())
        origin = f"ga:{label}:sg{made.spacegroup}"
        return Proposal(made.structure, origin=origin, screening=made.screening)

    def _random_structure(self) -> tuple[Structure, tuple[int, ...], Screening | None] | None:
        made = self.random_stream.next()
        return None if made.structure is None else (made.structure, (), made.screening)

    def _remember(self, operator: str, parents: tuple[int, ...]) -> None:
        self.last_proposal = (operator, parents)
        self._stats(operator)["proposed"] += 1

    def _stats(self, operator: str) -> dict[str, int]:
        stats = self.operator_stats.setdefault(operator, {})
        for key in ("proposed", "judged", "entered", "new_best"):
            stats.setdefault(key, 0)
        return stats

    def operator_probabilities(self) -> np.ndarray:
        """The configured operator probabilities, shifted toward the operators whose children pay off.

        With ``ga.adaptive_operators`` each operator's weight is multiplied by its success rate, (children
        that entered the population as a new minimum + 2 x those that became the best + 1) / (children
        judged + 2), and
        the result is mixed with the configured probabilities (ADAPTIVE_FLOOR of them stay fixed), so no
        operator is ever switched off by a few unlucky children. The rates come from the search state, so
        a resumed search draws exactly as the original would have.
        """
        if not self.ga.adaptive_operators:
            return self._operator_p
        rates = []
        for name in self._operator_names:
            stats = self.operator_stats.get(name, {})
            reward = stats.get("entered", 0) + 2 * stats.get("new_best", 0)
            rates.append((reward + 1) / (stats.get("judged", 0) + 2))
        weighted = self._operator_p * np.array(rates)
        weighted /= weighted.sum()
        return (1.0 - ADAPTIVE_FLOOR) * weighted + ADAPTIVE_FLOOR * self._operator_p

    def _parents_for(self, operator: VariationOperator) -> list[Member]:
        """Parents by tournament; for an operator that needs parents of one space group, the second
        parent wins a tournament among the first's group-mates (the first itself when it has none, which
        the caller treats as a failed try)."""
        if not operator.mates_in_group:
            return self._select(operator.n_parents)
        first = self._select(1)[0]
        mates = [
            m for m in self.population
            if m is not first and m.spacegroup is not None and m.spacegroup == first.spacegroup
        ]  # fmt: skip
        if first.spacegroup in (None, 1) or not mates:
            return [first, first]
        with self._deap_random():
            return [first, self._tournament_winner(mates)]

    def _select(self, k: int) -> list[Member]:
        """Tournament on fitness (single objective) or on NSGA-II rank and crowding (several)."""
        with self._deap_random():
            if len(self.objectives) == 0:
                # DEAP's selTournament (same draws), with mined-out members losing to fresh ones
                return [self._tournament_winner(self.population) for _ in range(k)]
            ranked = _nsga2_order(self.population)
            picks = []
            for _ in range(k):
                contenders = random.sample(range(len(ranked)), min(self.ga.tournament_size, len(ranked)))
                picks.append(ranked[min(contenders)])
            return picks

    def _tournament_winner(self, members: list[Member]) -> Member:
        """One single-objective tournament among ``members``; call inside ``_deap_random``."""
        aspirants = [random.choice(members) for _ in range(self.ga.tournament_size)]
        return min(aspirants, key=lambda m: (m.exhausted, m.scores))

    @contextmanager
    def _deap_random(self):
        outside = random.getstate()
        random.setstate(self._py_random_state)
        try:
            yield
        finally:
            self._py_random_state = random.getstate()
            random.setstate(outside)

    # -- learning ------------------------------------------------------------------------------------
    def proposed(self, candidate_id: int) -> None:
        if self.last_proposal is not None:
            self.outstanding[candidate_id] = self.last_proposal[0]
            self.last_proposal = None

    def tell(self, candidate_id: int, evaluation: Evaluation) -> None:
        operator = self.outstanding.pop(candidate_id, None)
        # a surrogate's skip says nothing about the child; any other outcome does (a rejected or duplicate
        # child, or a failed relaxation, is a child that did not pay off)
        if operator and evaluation.status is not Status.SKIPPED:
            self._stats(operator)["judged"] += 1
        if evaluation.status not in (Status.RELAXED,) or evaluation.relaxed is None:
            return
        self.told += 1
        values = evaluation.extra.get("objectives", {})
        scores = objective_scores(evaluation.enthalpy_per_atom, values, self.objectives)
        member = Member(candidate_id, evaluation.relaxed, scores, evaluation.spacegroup_number)
        best_before = min((m.scores[0] for m in self.population), default=np.inf)
        refound = {i for i in (evaluation.duplicate_of, evaluation.supersedes) if i is not None}
        for other in self.population:
            if other.candidate_id in refound:
                other.refound += 1
                member.refound = other.refound  # a lower copy replaces the member: the history stays
        entered = self._insert(member, evaluation.duplicate_of, evaluation.supersedes)
        # a child that relaxed into a known minimum replaces it when a little lower, but found nothing new:
        # only a new minimum earns its operator credit
        new_minimum = evaluation.duplicate_of is None and evaluation.supersedes is None
        if operator and entered and new_minimum:
            self._stats(operator)["entered"] += 1
            if scores[0] < best_before - 1e-6:
                self._stats(operator)["new_best"] += 1
        self._update_hall_of_fame(member, evaluation.duplicate_of)
        if self.told % self.ga.population_size == 0:
            record = self._statistics.compile(self.population)
            self.logbook.append({"evaluations": self.told, **{k: float(v) for k, v in record.items()}})
            del self.logbook[:-LOGBOOK_KEPT]

    def _insert(self, member: Member, duplicate_of: int | None, supersedes: int | None = None) -> bool:
        """Place a relaxed child in the population, respecting niches; True if it got in."""
        member.fitness = self._fitness_class(member.scores)
        same_as = {i for i in (duplicate_of, supersedes) if i is not None}
        for i, other in enumerate(self.population):
            same_minimum = other.candidate_id in same_as
            same_niche = (
                abs(other.scores[0] - member.scores[0]) < self.ga.niche_energy_tol
                and other.spacegroup == member.spacegroup
                and len(other.structure) == len(member.structure)
            )
            if same_minimum or same_niche:
                if member.scores < other.scores:
                    self.population[i] = member
                    return True
                return False
        if duplicate_of is not None:
            return False  # the same minimum was in the population once and was selected out
        self.population.append(member)
        if len(self.population) > self.ga.population_size:
            if self.objectives:
                self.population = tools.selNSGA2(self.population, self.ga.population_size)
            else:
                self.population.sort(key=lambda m: m.scores)
                self.population = self.population[: self.ga.population_size]
        return any(m is member for m in self.population)

    def _update_hall_of_fame(self, member: Member, duplicate_of: int | None) -> None:
        if duplicate_of is not None:
            return
        self.hall_of_fame.append({"id": member.candidate_id, "enthalpy_per_atom": member.scores[0]})
        self.hall_of_fame.sort(key=lambda entry: entry["enthalpy_per_atom"])
        del self.hall_of_fame[HALL_OF_FAME_SIZE:]

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "ga",
            "rng": self.rng.bit_generator.state,
            "py_random": self._py_random_json(),
            "population": self._population_state(),
            "hall_of_fame": self.hall_of_fame,
            "initial_proposed": self.initial_proposed,
            "told": self.told,
            "outstanding": {str(k): v for k, v in self.outstanding.items()},
            "operator_stats": self.operator_stats,
            "logbook": self._logbook_json(),
            "generator_seeds": None if self.seeder is None else self.seeder.state_dict(),
            "random_next": self.random_stream.next_index,
            "children": self.children.state_dict(),
        }

    def _encoded_once(self, part: str, signature: Any, items: Callable[[], list]) -> PreEncodedList:
        """A part of the state as a PreEncodedList, made and encoded again only when ``signature`` changes."""
        cached = self._encoded.get(part)
        if cached is None or cached[0] != signature:
            cached = self._encoded[part] = (signature, PreEncodedList(items()))
        return cached[1]

    def _py_random_json(self) -> PreEncodedList:
        """DEAP's random state (625 numbers): it changes only when a tournament draws from it."""
        state = self._py_random_state
        return self._encoded_once("py_random", state, lambda: [state[0], list(state[1]), state[2]])

    def _logbook_json(self) -> PreEncodedList:
        """The statistics record: it changes only when a record is added."""
        signature = (len(self.logbook), self.logbook[-1]["evaluations"] if self.logbook else None)
        return self._encoded_once("logbook", signature, lambda: list(self.logbook))

    def _population_state(self) -> PreEncodedList:
        """The members: they change when membership or a member's history changes."""
        signature = tuple((member.candidate_id, member.refound) for member in self.population)
        return self._encoded_once("population", signature, lambda: [m.as_state() for m in self.population])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "ga":
            raise ValueError(f"checkpointed search is {state.get('kind')!r}, not ga")
        self.rng.bit_generator.state = state["rng"]
        version, internal, gauss = state["py_random"]
        self._py_random_state = (version, tuple(internal), gauss)
        self._encoded.clear()
        self.population = []
        for entry in state["population"]:
            structure = structure_from_dict(entry["structure"])
            member = Member(
                entry["id"], structure, tuple(entry["scores"]), entry["sg"],
                structure_dict=entry["structure"], refound=int(entry.get("refound", 0)),
            )  # fmt: skip
            member.fitness = self._fitness_class(member.scores)
            self.population.append(member)
        self.hall_of_fame = state["hall_of_fame"]
        self.initial_proposed = state["initial_proposed"]
        self.told = state["told"]
        self.outstanding = {int(k): v for k, v in state["outstanding"].items()}
        self.operator_stats = state["operator_stats"]
        self.logbook = state["logbook"]
        if self.seeder is not None:
            self.seeder.load_state_dict(state.get("generator_seeds"))
        self.random_stream.restart_at(int(state.get("random_next", 0)))
        members = {member.candidate_id: member for member in self.population}
        self.children.load_state_dict(state.get("children"), members)


def _nsga2_order(population: list[Member]) -> list[Member]:
    """Population sorted by NSGA-II: non-domination rank first, then larger crowding distance."""
    fronts = tools.sortNondominated(population, len(population))
    ordered = []
    for front in fronts:
        tools.emo.assignCrowdingDist(front)
        ordered.extend(sorted(front, key=lambda m: -m.fitness.crowding_dist))
    return ordered
