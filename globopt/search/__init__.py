"""Search algorithms: they propose candidates and learn from results; they never call the potential."""

from globopt.search.base import SearchAlgorithm
from globopt.search.random_search import RandomSymmetricSearch

__all__ = ["RandomSymmetricSearch", "SearchAlgorithm", "make_search"]


def make_search(config) -> SearchAlgorithm:
    """The search algorithm a run config asks for."""
    if config.mode == "random":
        return RandomSymmetricSearch(
            composition=config.composition,
            seed=config.seed,
            spacegroups=config.random.spacegroups,
            volume_factor=config.random.volume_factor,
        )
    raise ValueError(f"unknown search mode {config.mode!r}")
