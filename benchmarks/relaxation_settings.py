"""Which optimiser settings relax the candidates of a 10-30 atom search best, per force call?

A crystal-structure search spends nearly all of its time in relaxations, and a relaxation that stops at
``relax.max_steps`` before converging is wasted: its structure cannot be ranked or bred from. This script
takes the first random symmetric structures a `mode: random` search would propose for suite entries
(pyxtal, with the run's rattle), relaxes each with several optimiser variants from the same start, and
records per variant: converged or not, optimiser steps, potential (force) calls, final enthalpy per atom
and seconds. Every variant runs to a high step cap, and the FIRE variants also report what a 300-step cap
would have given (the same trajectory cut at step 300), so one run answers both "which optimiser" and
"how many steps".

    GLOBOPT_MODELS=../shared/models .venv/bin/python benchmarks/relaxation_settings.py \
        --suite benchmarks/suites/hard.yaml --structures GaN-16 SiO2-18 Mg2SiO4 --per-entry 10 \
        --out benchmarks/results/relaxation_settings.json

Results are appended per structure, so a killed run continues where it stopped (rerun the same command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

CAP = 1000
SHORT_CAP = 300
FMAX = 0.05


def variants() -> dict[str, Any]:
    """Optimiser factories: (atoms with calculator) -> (optimizable, optimizer)."""
    from ase.optimize import BFGS, FIRE, LBFGS
    from ase.optimize.fire2 import FIRE2

    from globopt.evaluator.cell_filter import FastFrechetCellFilter

    def filtered(optimizer_class, **kwargs):
        def make(atoms):
            target = FastFrechetCellFilter(atoms)
            return target, optimizer_class(target, logfile=None, **kwargs)

        return make

    return {
        "FIRE": filtered(FIRE),
        "FIRE maxstep 0.1": filtered(FIRE, maxstep=0.1),
        "FIRE2": filtered(FIRE2),
        "LBFGS": filtered(LBFGS),
        "BFGS": filtered(BFGS),
    }


def starting_structures(content: dict[str, int], count: int, seed: int, rattle: float, checks) -> list:
    """The first ``count`` proposals of a random search of ``content`` that pass the geometry checks,
    rattled as in a run, as (origin, atoms); also used by batched_relaxation.py."""
    from pymatgen.io.ase import AseAtomsAdaptor

    from globopt.evaluator.evaluate import EvaluatorSettings, rattle_within_limits
    from globopt.evaluator.relax import RelaxSettings
    from globopt.geometry import geometry_limits, geometry_problem
    from globopt.search.random_search import RandomSymmetricSearch

    limits = geometry_limits(content, content.values(), *checks)
    search = RandomSymmetricSearch([content], seed, limits=limits)
    settings = EvaluatorSettings(
        {}, RelaxSettings(min_distance=limits.min_distance), rattle=rattle, seed=seed
    )
    structures = []
    candidate_id = 0
    while len(structures) < count:
        proposal = search.propose()
        candidate_id += 1
        if geometry_problem(proposal.structure, limits):
            continue
        atoms = AseAtomsAdaptor.get_atoms(proposal.structure)
        atoms.positions += rattle_within_limits(atoms, settings, candidate_id)
        structures.append((proposal.origin, atoms))
    return structures


def relax_one(atoms, make, calculator) -> dict[str, Any]:
    from globopt.evaluator.relax import ENERGY_FLOOR_EV_PER_ATOM
    from surrogates.potentials import TimedCalculator

    atoms = atoms.copy()
    timed = TimedCalculator(calculator)
    atoms.calc = timed
    _, optimizer = make(atoms)
    started = time.perf_counter()
    n = len(atoms)
    energies, converged_at, failure = [], None, ""
    try:
        for converged in optimizer.irun(fmax=FMAX, steps=CAP):
            energy = float(atoms.get_potential_energy())
            energies.append(energy / n)
            if not math.isfinite(energy) or energy / n < ENERGY_FLOOR_EV_PER_ATOM:
                failure = "exploded or NaN"
                break
            if atoms.get_volume() / n > 200 or atoms.get_volume() / n < 2:
                failure = "volume out of bounds"
                break
            if converged:
                converged_at = optimizer.nsteps
                break
    except Exception as exc:  # an optimiser may fail on a bad start; record, do not stop the study
        failure = f"{type(exc).__name__}: {exc}"
    return {
        "converged_at_step": converged_at,
        "steps": optimizer.nsteps,
        "force_calls": timed.calls,
        "final_energy_per_atom": energies[-1] if energies else None,
        "energy_at_step": {str(k): energies[k] for k in (50, 100, 200, SHORT_CAP - 1) if k < len(energies)},
        "seconds": time.perf_counter() - started,
        "failure": failure,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", type=Path, default=Path("benchmarks/suites/hard.yaml"))
    parser.add_argument("--structures", nargs="+", required=True)
    parser.add_argument("--per-entry", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", help="default: all")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/relaxation_settings.json"))
    args = parser.parse_args()

    import torch

    from globopt.scoreboard.suite import load_suite
    from surrogates.potentials import build_calculator

    torch.set_num_threads(1)
    suite = load_suite(args.suite)
    calculator = build_calculator(**suite.spec.potential)
    makers = variants()
    chosen = args.variants or list(makers)
    document = json.loads(args.out.read_text()) if args.out.exists() else {"results": []}
    document.update(
        {
            "command": "python benchmarks/relaxation_settings.py " + " ".join(os.sys.argv[1:]),
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
            "potential": suite.spec.potential,
            "fmax": FMAX,
            "cap": CAP,
        }
    )
    done = {(r["entry"], r["index"], r["variant"]) for r in document["results"]}
    for entry in suite.select(args.structures):
        structures = starting_structures(
            entry.composition, args.per_entry, args.seed, 0.05, (0.6, (0.4, 8.0))
        )
        for index, (origin, atoms) in enumerate(structures):
            for name in chosen:
                if (entry.name, index, name) in done:
                    continue
                result = relax_one(atoms, makers[name], calculator)
                document["results"].append(
                    {"entry": entry.name, "index": index, "origin": origin, "variant": name, **result}
                )
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(document, indent=1))
                energy = result["final_energy_per_atom"] or float("nan")
                print(
                    f"{entry.name} #{index} {name:18s} steps {result['steps']:5d} calls "
                    f"{result['force_calls']:5d} E {energy:.4f} conv {result['converged_at_step']} "
                    f"{result['failure']}",
                    flush=True,
                )
    summarise(document["results"])
    return 0


def summarise(results: list[dict[str, Any]]) -> None:
    """Per variant: converged within the cap (and within 300 steps), force calls, and how often it ended
    lowest among the variants from the same start (within 2 meV/atom)."""
    starts: dict[tuple, dict[str, dict]] = {}
    for r in results:
        starts.setdefault((r["entry"], r["index"]), {})[r["variant"]] = r
    for variant in sorted({r["variant"] for r in results}):
        mine = [r for r in results if r["variant"] == variant]
        converged = [r for r in mine if r["converged_at_step"] is not None]
        within_300 = [r for r in converged if r["converged_at_step"] < SHORT_CAP]
        lowest = 0
        for runs in starts.values():
            energies = [
                x["final_energy_per_atom"] for x in runs.values() if x["final_energy_per_atom"] is not None
            ]
            mine_here = runs.get(variant)
            if mine_here and mine_here["final_energy_per_atom"] is not None and energies:
                lowest += mine_here["final_energy_per_atom"] <= min(energies) + 0.002
        calls = [r["force_calls"] for r in mine]
        print(
            f"{variant:18s} n {len(mine):3d} converged {len(converged):3d} "
            f"(within 300 steps {len(within_300):3d}) force calls median {np.median(calls):6.0f} "
            f"mean {np.mean(calls):6.0f} lowest-of-variants {lowest:3d}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
