"""Objectives beside enthalpy, and Pareto fronts over them.

Each objective is turned into a number to minimise ("score"), so that DEAP's NSGA-II and the Pareto
front in results.csv treat every goal the same way: ``target`` scores |value - target|, ``min`` the
value, ``max`` minus the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymatgen.core import Structure


def objective_values(structure: Structure, objectives: Sequence[Any]) -> dict[str, float]:
    """Raw property values of a relaxed structure, keyed by objective name."""
    values = {}
    for objective in objectives:
        if objective.property == "density":
            values[objective.name] = float(structure.density)
        elif objective.property == "volume_per_atom":
            values[objective.name] = structure.volume / len(structure)
        else:  # guarded by the config schema
            raise ValueError(f"unknown objective property {objective.property!r}")
    return values


def objective_scores(enthalpy_per_atom: float, values: dict[str, float], objectives: Sequence[Any]) -> tuple:
    """(enthalpy, score_1, ...) with every entry to be minimised."""
    scores = [enthalpy_per_atom]
    for objective in objectives:
        value = values[objective.name]
        if objective.goal == "target":
            scores.append(abs(value - objective.target))
        elif objective.goal == "min":
            scores.append(value)
        else:
            scores.append(-value)
    return tuple(scores)


def pareto_front(points: dict[int, tuple]) -> set[int]:
    """Ids of the non-dominated points (all coordinates minimised)."""
    front = set()
    for key, p in points.items():
        dominated = any(
            all(a <= b for a, b in zip(q, p, strict=True)) and any(a < b for a, b in zip(q, p, strict=True))
            for other, q in points.items()
            if other != key
        )
        if not dominated:
            front.add(key)
    return front
