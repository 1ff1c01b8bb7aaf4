"""The search algorithm a run config asks for.

Each algorithm is imported only when asked for: they pull in their own libraries (DEAP, pyxtal, spglib),
and an HTVS screen needs none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from globopt.search.base import SearchAlgorithm

if TYPE_CHECKING:
    from globopt.config import RunConfig
    from globopt.geometry import GeometryLimits


def make_search(config: RunConfig, limits: GeometryLimits | None) -> SearchAlgorithm:
    """The search algorithm ``config.mode`` names, set up from the config."""
    if config.mode == "htvs":
        from globopt.htvs.enumeration import Enumeration
        from globopt.htvs.search import HtvsSearch
        from surrogates.potentials import covered_elements

        covered = covered_elements(config.potential.kind, config.potential.model)
        return HtvsSearch(Enumeration(config.htvs, covered), config.htvs.stop_after)
    contents = config.cell_contents
    if config.mode == "random":
        from globopt.search.random_search import RandomSymmetricSearch

        return RandomSymmetricSearch(
            contents, config.seed, config.random.spacegroups, config.random.volume_factor
        )
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
        )  # fmt: skip
    raise ValueError(f"unknown search mode {config.mode!r}")
