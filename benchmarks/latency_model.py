"""A stand-in for M3GNet relaxations that costs (almost) no CPU: a scheduler benchmark, never physics.

Each "relaxation" sleeps for a time drawn from the relaxation times measured with M3GNet and returns a real
relaxed structure from a bundled set (benchmarks/data/nacl8_m3gnet.json: Na4Cl4 relaxed with
M3GNet-MP-2021.2.8-PES from random symmetric cells, with each relaxation's optimiser steps and seconds on
one core). What it exercises is everything *around* the potential: rank 0's search, screening, archive and
MPI protocol, and the workers' idle time between tasks.

* The time of candidate ``k`` is the step count of a bundled relaxation drawn from (run seed, k), times a
  per-step cost chosen so that the mean is ``mean_seconds``: the measured spread of relaxation times
  (a few fast ones, a long tail of slow ones) at any mean.
* A candidate of the bundle's composition relaxes into that drawn bundled minimum (its energy, structure,
  space group), so a search meets realistic duplicates of relaxed minima. A candidate of another
  composition (a screen) relaxes into itself, with an energy drawn from its composition and id.
* The worker-side analysis of a bundled minimum (space group, reduced cell, JSON) is computed once per
  process and reused, so the workers of a 64-rank run on a 2-core machine do not steal rank 0's CPU; a
  screen's own structures are analysed as a real worker would.

``install(model)`` replaces globopt's single-structure ``evaluate`` in this process (MPI ranks and the
in-process backend call it by module attribute); the run config must use a potential that does not batch
(``potential.kind: emt`` with elements EMT does not know is fine: it is never called).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from globopt.candidate import Evaluation, RelaxTask, Status
from globopt.structure_codec import structure_from_json

BUNDLE = Path(__file__).resolve().parent / "data" / "nacl8_m3gnet.json"
# the sleep is cut into pieces this long so MPI workers send heartbeats and see stop requests
SLICE_SECONDS = 0.5


@dataclass
class _Minimum:
    structure_json: str
    energy_per_atom: float
    n_steps: int
    cache: dict = field(default_factory=dict)  # the worker-side analysis, computed once per process


@dataclass
class LatencyModel:
    """Relaxation times with mean ``mean_seconds`` and the bundle's spread; minima from the bundle."""

    mean_seconds: float
    minima: list[_Minimum]
    formula: str
    mean_steps: float

    @classmethod
    def load(cls, mean_seconds: float, path: Path = BUNDLE) -> LatencyModel:
        data = json.loads(path.read_text())
        minima = [
            _Minimum(e["structure"], e["energy_per_atom"], int(e["n_steps"]))
            for e in data["relaxations"]
            if e["status"] == "relaxed"
        ]
        mean_steps = float(np.mean([m.n_steps for m in minima]))
        return cls(mean_seconds, minima, data["formula"], mean_steps)

    def draw(self, seed: int, candidate_id: int) -> tuple[_Minimum, float]:
        """The bundled relaxation standing in for candidate ``candidate_id``, and its seconds."""
        rng = np.random.default_rng([seed % 2**63, candidate_id, 7])
        minimum = self.minima[int(rng.integers(len(self.minima)))]
        return minimum, self.mean_seconds * minimum.n_steps / self.mean_steps

    def evaluate(self, task: RelaxTask, settings, on_step: Callable[[int, float], None] | None = None):
        """What a worker returns for ``task``, after sleeping the drawn relaxation time."""
        from globopt.evaluator.evaluate import worker_label

        started = time.perf_counter()
        minimum, seconds = self.draw(settings.seed, task.candidate_id)
        n_atoms = len(task.structure)
        own = task.structure.composition.reduced_formula != self.formula
        if own:  # a screen's candidate: it "relaxes" into itself
            relaxed = task.structure
            energy = _energy_of(task.structure.composition.reduced_formula, task.candidate_id)
            analysis = _analyse(relaxed, settings.symprec)
        else:
            if not minimum.cache:
                minimum.cache.update(_analyse(structure_from_json(minimum.structure_json), 0.1))
            analysis = minimum.cache
            relaxed, energy = analysis["structure"], minimum.energy_per_atom
        result = Evaluation(
            candidate_id=task.candidate_id,
            status=Status.RELAXED,
            relaxed=relaxed,
            relaxed_json=analysis["json"],
            relaxed_reduced=analysis["reduced"],
            relaxed_minima=analysis["minima"],
            energy=energy * n_atoms,
            energy_per_atom=energy,
            enthalpy_per_atom=energy,
            spacegroup=analysis["spacegroup"][0],
            spacegroup_number=analysis["spacegroup"][1],
            n_steps=minimum.n_steps,
            n_force_calls=minimum.n_steps + 1,
            worker=worker_label(),
        )
        between = None if on_step is None else (lambda: on_step(0, math.nan))
        _build_requested(task, settings, result, between)
        _sleep_until(started + seconds, on_step)
        result.seconds = result.potential_seconds = time.perf_counter() - started
        return result


def _build_requested(task: RelaxTask, settings, result: Evaluation, between) -> None:
    """The random structures rank 0 asked for (as evaluate() builds them; also for older globopt code)."""
    if task.generate:
        from globopt.geometry import GeometryLimits
        from globopt.search.random_stream import build_for_screening

        limits = GeometryLimits(settings.relax.min_distance, settings.relax.volume_per_atom_range)
        result.generated = build_for_screening(task.generate, limits, settings.symprec, between)


def _analyse(structure: Structure, symprec: float) -> dict:
    from globopt.duplicates import lattice_minima, reduced_for_matching
    from globopt.evaluator.evaluate import spacegroup_of
    from globopt.structure_codec import structure_to_json

    reduced = reduced_for_matching(structure)
    return {
        "structure": structure,
        "json": structure_to_json(structure),
        "reduced": reduced,
        "minima": lattice_minima(reduced),
        "spacegroup": spacegroup_of(structure, symprec),
    }


def _energy_of(formula: str, candidate_id: int) -> float:
    """A screen candidate's energy per atom: -3..-7 eV/atom by composition, spread 0.5 eV/atom by its id
    (two templates of one composition rarely fall within the energy window of the duplicate check)."""
    digest = hashlib.sha256(formula.encode()).digest()
    base = -3.0 - 4.0 * digest[0] / 255.0
    return base + 0.5 * ((candidate_id * 2654435761) % 1000) / 1000.0


def _sleep_until(deadline: float, on_step: Callable[[int, float], None] | None) -> None:
    step = 0
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(min(left, SLICE_SECONDS))
        step += 1
        if on_step is not None:
            on_step(step, math.nan)


def install(model: LatencyModel) -> None:
    """Make every ``evaluate`` of this process the latency model (worker ranks and the serial backend reach
    it through ``evaluate_task``, which still makes the duplicate comparisons a task carries)."""
    import globopt.evaluator.evaluate as evaluate_module

    evaluate_module.evaluate = model.evaluate
