"""Baseline: ASE's genetic algorithm for bulk crystals (PyPI package ``ase-ga``), run at globopt's budget.

It follows the ase-ga bulk-GA recipe (random start population from StartGenerator; cut-and-splice pairing,
soft mutation, strain and permutation mutations; OFP-fingerprint comparator; Population with extinction)
and differs from it only where fairness needs it: every relaxation uses the *same* calculator
(``surrogates.potentials.build_calculator``), the same ``globopt.evaluator.relax.relax`` with the same
fmax, step limit and geometry guards as the globopt searches, and every relaxation (start population
included) counts against the same evaluation budget. Install with ``pip install -e ".[baselines]"``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers, covalent_radii
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from globopt.scoreboard.hits import EvaluatedStructure
from globopt.scoreboard.jobs import SearchJob, globopt_config

# Raw score of a relaxation that failed (exploded / collapsed / NaN): worse than any real structure, so
# the population drops it, but still a number, as the ase-ga database requires one.
FAILED_SCORE = -1.0e6
# Offspring attempts in a row that return None before the baseline gives up (ase-ga's operators return
# None when they cannot build a child that passes the distance checks).
MAX_FAILED_OFFSPRING = 1000


class AseGaUnavailable(RuntimeError):
    pass


def require_ase_ga() -> None:
    """Raise a clear error when the optional dependency is missing."""
    try:
        import ase_ga  # noqa: F401
    except ImportError as exc:
        from globopt.config import ConfigError

        raise ConfigError(
            "mode ase-ga needs the optional package ase-ga: pip install -e '.[baselines]' "
            f"(or pip install ase-ga); import failed: {exc}"
        ) from exc


def run_ase_ga(job: SearchJob) -> tuple[list[EvaluatedStructure], float, float | None]:
    """Run (or reuse a finished) ase-ga search; evaluations in the order they finished."""
    folder = Path(job.run_dir)
    record = folder / "evaluations.json"
    if record.exists():
        data = json.loads(record.read_text())
        # a record of the whole budget also answers a search that would have stopped at its first hit
        if data["budget"] == job.budget and data.get("stop_at_energy") in (None, job.stop_at_energy):
            return _from_record(data, folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("ga.db", "used_modes.json", "population.log"):
        (folder / stale).unlink(missing_ok=True)  # an unfinished earlier attempt is redone from the start
    evaluations, started = _search(job, folder)
    data = {
        "budget": job.budget,
        "stop_at_energy": job.stop_at_energy,
        "started_at": started,
        "evaluations": [
            {
                "structure": json.loads(e.structure.to_json()) if e.structure else None,
                "energy_per_atom": e.energy_per_atom,
                "finished_at": e.finished_at,
                "force_calls": e.force_calls,
                "origin": e.origin,
                "seconds": e.seconds,
            }
            for e in evaluations
        ],
    }
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, record)
    return _from_record(data, folder)


def _from_record(data: dict[str, Any], folder: Path) -> tuple[list[EvaluatedStructure], float, float | None]:
    """Evaluations of a finished search from its record.

    A record written before force calls and origins were kept lacks them: the origins are read back from
    the search's ase-ga database, whose relaxed rows are in the same order; force calls and relaxation
    times were not stored anywhere, so they stay None (the summary says how many runs lack them).
    """
    stored = data["evaluations"]
    origins = [e.get("origin") for e in stored]
    if any(o is None for o in origins):
        origins = _origins_from_database(folder, len(stored))
    evaluations = [
        EvaluatedStructure(
            Structure.from_dict(e["structure"]) if e["structure"] else None,
            e["energy_per_atom"],
            e["finished_at"],
            force_calls=e.get("force_calls"),
            origin=origin,
            seconds=e.get("seconds"),
        )
        for e, origin in zip(stored, origins, strict=True)
    ]
    energies = [e.energy_per_atom for e in evaluations if e.energy_per_atom is not None]
    return evaluations, data["started_at"], min(energies) if energies else None


# ase-ga's operator names (the ``origin`` key it stores with each candidate) -> the origin label of a
# benchmark record, ``ase-ga:<operator>``, which hits.origin_class maps onto the classes of globopt's own
_ASE_GA_ORIGINS = {
    "StartingCandidateUnrelaxed": "start",
    "CutAndSplicePairing": "pairing",
    "SoftMutation": "soft",
    "StrainMutation": "strain",
    "PermutationMutation": "permutation",
}


def ase_ga_origin(atoms: Atoms) -> str:
    """``ase-ga:start`` for the random start population, ``ase-ga:pairing`` / ``:soft`` / ... for children."""
    name = str(atoms.info.get("key_value_pairs", {}).get("origin", ""))
    return f"ase-ga:{_ASE_GA_ORIGINS.get(name, name or 'unknown')}"


def _origins_from_database(folder: Path, count: int) -> list[str]:
    """Origins of a search's relaxations from its ga.db: each relaxation added one relaxed row, in order."""
    from ase.db import connect

    path = folder / "ga.db"
    if not path.exists():
        return ["ase-ga:unknown"] * count
    with connect(str(path)) as db:
        rows = sorted(db.select(relaxed=1), key=lambda row: row.id)
    origins = [f"ase-ga:{_ASE_GA_ORIGINS.get(row.get('origin', ''), 'unknown')}" for row in rows]
    return origins if len(origins) == count else ["ase-ga:unknown"] * count


def _search(job: SearchJob, folder: Path) -> tuple[list[EvaluatedStructure], float]:
    from ase_ga import set_raw_score
    from ase_ga.cutandsplicepairing import CutAndSplicePairing
    from ase_ga.data import DataConnection, PrepareDB
    from ase_ga.offspring_creator import OperationSelector
    from ase_ga.ofp_comparator import OFPComparator
    from ase_ga.population import Population
    from ase_ga.soft_mutation import SoftMutation
    from ase_ga.standardmutations import PermutationMutation, StrainMutation
    from ase_ga.startgenerator import StartGenerator
    from ase_ga.utilities import CellBounds, closest_distances_generator

    from globopt.config import parse_config
    from globopt.evaluator.relax import relax
    from globopt.geometry import geometry_limits
    from globopt.pipeline import relax_settings
    from surrogates.potentials import build_calculator

    # the run config of the globopt GA for the same job: relaxation, checks and population settings
    config = parse_config({**globopt_config(job), "mode": "ga"}, source=f"benchmark search {job.label}")
    limits = geometry_limits(
        config.composition, config.composition.values(), config.checks.min_distance_factor,
        config.checks.volume_factor_range,
    )  # fmt: skip
    settings = relax_settings(config, limits)
    calculator = build_calculator(**config.potential.model_dump())
    rng = np.random.RandomState(job.seed)  # ase-ga draws with randint/random (legacy RandomState API)
    population_size = config.ga.population_size

    numbers = [atomic_numbers[el] for el, n in job.composition.items() for _ in range(n)]
    n_atoms = len(numbers)
    unique = sorted(set(numbers))
    blmin = closest_distances_generator(unique, ratio_of_covalent_radii=config.checks.min_distance_factor)
    # a start volume of twice the covalent-sphere volume: close to the density of ionic/covalent solids
    volume = 2.0 * sum(4.0 / 3.0 * math.pi * covalent_radii[z] ** 3 for z in numbers)
    cellbounds = CellBounds(
        bounds={"phi": [30, 150], "chi": [30, 150], "psi": [30, 150], "a": [1.5, 25], "b": [1.5, 25],
                "c": [1.5, 25]}
    )  # fmt: skip
    slab = Atoms("", pbc=True)
    blocks = [(z, numbers.count(z)) for z in unique]
    generator = StartGenerator(
        slab, blocks, blmin, number_of_variable_cell_vectors=3, box_volume=volume, cellbounds=cellbounds,
        rng=rng,
    )  # fmt: skip
    db_path = str(folder / "ga.db")
    prepare = PrepareDB(db_path, stoichiometry=numbers)
    started = time.time()
    for _ in range(min(population_size, job.budget)):
        prepare.add_unrelaxed_candidate(generator.get_new_candidate())
    data = DataConnection(db_path)
    evaluations: list[EvaluatedStructure] = []

    def evaluate(atoms: Atoms) -> None:
        origin = ase_ga_origin(atoms)
        # the same promising-extension rule as globopt's searches: relative to the best so far
        known = [e.energy_per_atom for e in evaluations if e.energy_per_atom is not None]
        outcome = relax(atoms.copy(), calculator, settings, best_enthalpy_per_atom=min(known, default=None))
        relaxed = outcome.atoms
        cost = {"force_calls": outcome.n_force_calls, "origin": origin, "seconds": outcome.seconds}
        if outcome.failure is None and np.isfinite(outcome.energy):
            atoms.set_cell(relaxed.get_cell(), scale_atoms=False)
            atoms.set_positions(relaxed.get_positions())
            energy = outcome.enthalpy
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((len(atoms), 3)))
            set_raw_score(atoms, -energy)
            evaluations.append(
                EvaluatedStructure(
                    AseAtomsAdaptor.get_structure(relaxed), energy / len(atoms), time.time(), **cost
                )
            )
        else:
            atoms.calc = SinglePointCalculator(atoms, energy=-FAILED_SCORE, forces=np.zeros((len(atoms), 3)))
            set_raw_score(atoms, FAILED_SCORE)
            evaluations.append(EvaluatedStructure(None, None, time.time(), **cost))
        data.add_relaxed_step(atoms)

    def target_reached() -> bool:
        target = job.stop_at_energy
        return target is not None and any(
            e.energy_per_atom is not None and e.energy_per_atom <= target for e in evaluations
        )

    while data.get_number_of_unrelaxed_candidates() > 0 and not target_reached():
        evaluate(data.get_an_unrelaxed_candidate())

    comparator = OFPComparator(
        n_top=n_atoms, dE=1.0, cos_dist_max=1e-3, rcut=10.0, binwidth=0.05, pbc=[True, True, True],
        sigma=0.05, nsigma=4, recalculate=False,
    )  # fmt: skip
    pairing = CutAndSplicePairing(
        slab, n_atoms, blmin, p1=1.0, p2=0.0, minfrac=0.15, number_of_variable_cell_vectors=3,
        cellbounds=cellbounds, use_tags=False, rng=rng,
    )  # fmt: skip
    strain = StrainMutation(blmin, stddev=0.7, cellbounds=cellbounds, use_tags=False, rng=rng)
    soft = SoftMutation(
        closest_distances_generator(unique, 0.1), bounds=[2.0, 5.0], use_tags=False,
        used_modes_file=str(folder / "used_modes.json"),
    )  # fmt: skip
    operators: list[tuple[float, Any]] = [(4.0, pairing), (3.0, soft), (2.0, strain)]
    if len(unique) > 1:
        operators.append((1.0, PermutationMutation(n_atoms, probability=0.3, rng=rng)))
    selector = OperationSelector([p for p, _ in operators], [op for _, op in operators], rng=rng)
    population = Population(
        data_connection=data, population_size=population_size, comparator=comparator,
        logfile=str(folder / "population.log"), use_extinct=True, rng=rng,
    )  # fmt: skip
    failed = 0
    while len(evaluations) < job.budget and not target_reached():
        parents = population.get_two_candidates()
        child, description = selector.get_new_individual(parents)
        if child is None:
            failed += 1
            if failed >= MAX_FAILED_OFFSPRING:
                raise RuntimeError(f"ase-ga: {failed} offspring in a row failed its distance checks")
            continue
        failed = 0
        data.add_unrelaxed_candidate(child, description=description)
        evaluate(child)
        population.update()
    return evaluations, started
