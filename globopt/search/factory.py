"""The search algorithm a run config asks for.

Each algorithm is imported only when asked for: they pull in their own libraries (DEAP, pyxtal, spglib),
and an HTVS screen needs none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from globopt.geometry import geometry_limits
from globopt.search.base import SearchAlgorithm

if TYPE_CHECKING:
    from globopt.config import RunConfig


def make_search(config: RunConfig) -> SearchAlgorithm:
    """The search algorithm ``config.mode`` names, set up from the config, with its geometry limits."""
    checks = config.checks
    if config.mode == "htvs":
        from globopt.htvs.enumeration import Enumeration
        from globopt.htvs.search import HtvsSearch
        from surrogates.potentials import covered_elements

        covered = covered_elements(config.potential.kind, config.potential.model)
        enumeration = Enumeration(config.htvs, covered)
        return HtvsSearch(
            enumeration, config.htvs.stop_after, checks.min_distance_factor, checks.volume_factor_range
        )
    if config.chemical_system is not None:
        return _variable_composition_search(config)
    contents = config.cell_contents
    # proportions only: the same limits hold for every cell size of a formula-unit range
    limits = geometry_limits(
        config.composition,
        config.composition.values(),
        checks.min_distance_factor,
        checks.volume_factor_range,
    )
    if config.mode == "random":
        from globopt.search.random_search import RandomSymmetricSearch

        return RandomSymmetricSearch(
            contents, config.seed, config.random.spacegroups, config.random.volume_factor, limits,
            config.random.spacegroup_prior,
        )  # fmt: skip
    if config.mode == "ga":
        from globopt.search.ga import GeneticSearch

        return GeneticSearch(
            contents, limits, config.seed, config.ga, config.objectives, config.random,
            initial_population=config.initial_population,
        )  # fmt: skip
    if config.mode == "pso":
        from globopt.search.pso import ParticleSwarmSearch

        p = config.pso
        return ParticleSwarmSearch(
            contents, limits, config.seed, swarm_size=p.swarm_size, inertia=p.inertia, cognitive=p.cognitive,
            social=p.social, regenerate_fraction=p.regenerate_fraction, spacegroups=config.random.spacegroups,
            volume_factor=config.random.volume_factor, initial_population=config.initial_population,
            spacegroup_prior=config.random.spacegroup_prior,
        )  # fmt: skip
    raise ValueError(f"unknown search mode {config.mode!r}")


def _variable_composition_search(config: RunConfig) -> SearchAlgorithm:
    """A search over every composition of ``config.chemical_system`` (docs/hull.md)."""
    from globopt.hull.settings import space_from_config
    from globopt.hull.starts import fixed_starts, given_entries
    from globopt.hull.tracker import HullTracker

    space = space_from_config(config)
    tracker = HullTracker(config.chemical_system, given_entries(config))
    starts = fixed_starts(config)
    hull = config.hull
    if config.mode == "ga":
        from globopt.search.variable_ga import VariableCompositionGA

        return VariableCompositionGA(
            space, tracker, starts, config.seed, config.ga, config.random, hull.max_per_composition,
            hull.spread_temperature, initial_population=config.initial_population,
        )  # fmt: skip
    from globopt.search.variable_random import VariableCompositionRandom

    return VariableCompositionRandom(
        space, tracker, starts, config.seed, config.random, hull.spread_temperature
    )
