"""One search of a benchmark as plain data: what a worker process needs to run it, and its run config.

Its own module because both the globopt runner and the ase-ga baseline build on it, and neither should
import the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SearchJob:
    """Everything one search needs; plain data so it can be sent to a worker process."""

    entry: str
    mode: str
    seed: int
    budget: int
    composition: dict[str, int]
    potential: dict[str, Any]
    search: dict[str, Any]  # extra run-config keys (ga:, pso:, relax:, ...)
    run_dir: str
    reference: dict[str, Any]  # relaxed reference structure (pymatgen dict)
    reference_energy: float
    hit_tolerance: float
    torch_threads: int = 1
    # end the search once a relaxed structure is this low (the hit energy): evaluations after the first
    # hit change no success-rate figure, so they are not spent; None runs the whole budget
    stop_at_energy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.entry}-{self.mode}-s{self.seed}"


def globopt_config(job: SearchJob) -> dict[str, Any]:
    return {
        **job.search,
        "name": job.label,
        "mode": job.mode,
        "composition": job.composition,
        "seed": job.seed,
        "budget": {"evaluations": job.budget, "target_enthalpy_per_atom": job.stop_at_energy},
        "potential": job.potential,
    }
