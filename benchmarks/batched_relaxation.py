"""Relaxations per core-hour with M3GNet: one structure at a time against lockstep batches.

The same random symmetric cells (the first proposals of a `mode: random` search, rattled as in a run) are
relaxed with the single path (``relax()``) and with ``BatchRelaxer`` at each batch size, in alternating
chunks so that a change in the machine's load falls on every variant alike. Reported per variant: process
CPU seconds (one torch thread), relaxations per core-hour, optimiser steps, and the largest difference of
final energy and of step count against the single path for the same start.

    GLOBOPT_MODELS=../shared/models .venv/bin/python benchmarks/batched_relaxation.py \
        --formula Na4Cl4 --count 48 --chunk 16 --batch-sizes 4 8 16 --out batched_relaxation.json

``--device cuda`` runs the same on a GPU (batch sizes such as 8 64 256); compare its relaxations per second
(wall time) with a ``--device cpu`` run of the same cells, which is one CPU core.

``--profile`` writes a cProfile of the largest batch size's relaxations beside the JSON (FILE.prof) and
prints where the time went, which is how the per-step overhead outside the potential was found.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import time
from pathlib import Path
from typing import Any

# the geometry checks of a run's defaults: minimum-distance factor, volume window
CHECKS = (0.6, (0.4, 8.0))


def starting_cells(formula: str, count: int, seed: int) -> list:
    """The first ``count`` proposals of a random search of ``formula``, rattled as in a run, with the
    geometry limits of their composition (relaxation_settings.starting_structures)."""
    from pymatgen.core import Composition
    from relaxation_settings import starting_structures

    from globopt.geometry import geometry_limits

    content = {el.symbol: int(n) for el, n in Composition(formula).items()}
    limits = geometry_limits(content, content.values(), *CHECKS)
    return [(atoms, limits) for _, atoms in starting_structures(content, count, seed, 0.05, CHECKS)]


def relax_single(cells, calculator, settings) -> list[dict[str, Any]]:
    from globopt.evaluator.relax import relax

    out = []
    for atoms, _ in cells:
        outcome = relax(atoms.copy(), calculator, settings)
        out.append(_summary(outcome, len(atoms)))
    return out


def relax_batched(cells, calculator, settings, batch_size: int) -> list[dict[str, Any]]:
    """In-flight batching as a worker does it: a finished relaxation's place goes to the next cell."""
    from globopt.evaluator.batch_relax import BatchRelaxer

    relaxer = BatchRelaxer(calculator, settings)
    waiting = list(enumerate(cells))
    results: dict[int, dict[str, Any]] = {}
    while waiting or len(relaxer):
        while waiting and len(relaxer) < batch_size:
            index, (atoms, _) = waiting.pop(0)
            relaxer.add(index, atoms.copy())
        for index, outcome in relaxer.step():
            results[index] = _summary(outcome, len(cells[index][0]))
    return [results[i] for i in range(len(cells))]


def _summary(outcome, n_atoms: int) -> dict[str, Any]:
    status = outcome.failure or ("converged" if outcome.converged else "unconverged")
    energy = outcome.energy / n_atoms
    finite = energy if energy == energy else None
    return {"status": status, "steps": outcome.n_steps, "energy_per_atom": finite}


def _row(
    variant: str, mine: list[dict], single: list[dict], cpu: dict[str, float], wall: dict[str, float]
) -> dict[str, Any]:
    """One variant's cost and its agreement with the single path, start by start."""
    pairs = list(zip(mine, single, strict=True))
    energy_differences = [
        abs(a["energy_per_atom"] - b["energy_per_atom"])
        for a, b in pairs
        if a["energy_per_atom"] is not None and b["energy_per_atom"] is not None
    ]
    return {
        "variant": variant,
        "cpu_seconds": cpu[variant],
        "wall_seconds": wall[variant],
        "relaxations_per_core_hour": len(mine) * 3600 / cpu[variant],
        "relaxations_per_second": len(mine) / wall[variant],
        "gain": cpu["single"] / cpu[variant],
        "steps": sum(r["steps"] for r in mine),
        "same_status": sum(a["status"] == b["status"] for a, b in pairs),
        "within_1mev": sum(d <= 1e-3 for d in energy_differences),
        "max_energy_difference_ev_per_atom": max(energy_differences, default=0.0),
        "max_step_difference": max((abs(a["steps"] - b["steps"]) for a, b in pairs), default=0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formula", default="Na4Cl4")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--chunk", type=int, default=16, help="cells per alternation of the variants")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--optimizer", default="BFGS", help="the run's default: BFGS")
    parser.add_argument("--model", default="M3GNet-MP-2021.2.8-PES")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("batched_relaxation.json"))
    args = parser.parse_args()

    import torch

    from globopt.evaluator.relax import RelaxSettings
    from surrogates.potentials import build_calculator, device_problem

    if problem := device_problem(args.device):
        parser.error(problem)
    torch.set_num_threads(1)
    calculator = build_calculator("matgl", args.model, device=args.device)
    cells = starting_cells(args.formula, args.count, args.seed)
    settings = RelaxSettings(optimizer=args.optimizer, max_steps=500, min_distance=cells[0][1].min_distance)
    relax_single(cells[:2], calculator, settings)  # warm-up: lazy imports and first-call set-up
    variants = ["single"] + [f"batch {b}" for b in args.batch_sizes]
    cpu = dict.fromkeys(variants, 0.0)
    wall = dict.fromkeys(variants, 0.0)
    results: dict[str, list] = {v: [] for v in variants}
    load_before = os.getloadavg()[0]
    for start in range(0, len(cells), args.chunk):
        chunk = cells[start : start + args.chunk]
        for variant in variants:
            started, wall_started = time.process_time(), time.perf_counter()
            if variant == "single":
                results[variant] += relax_single(chunk, calculator, settings)
            else:
                size = int(variant.split()[1])
                results[variant] += relax_batched(chunk, calculator, settings, size)
            cpu[variant] += time.process_time() - started
            wall[variant] += time.perf_counter() - wall_started
        spent = ", ".join(f"{v} {cpu[v]:.1f} s" for v in variants)
        print(f"cells {start + len(chunk)}/{len(cells)}: {spent}")
    rows = [_row(variant, results[variant], results["single"], cpu, wall) for variant in variants]
    for r in rows:
        print(
            f"{r['variant']:9s} {r['cpu_seconds']:7.1f} CPU s, "
            f"{r['relaxations_per_core_hour']:.0f} per core-hour, "
            f"{r['relaxations_per_second']:.2f}/s (wall), "
            f"gain {r['gain']:.2f}x steps {r['steps']} same status {r['same_status']}/{len(cells)}, "
            f"final energy within 1 meV/atom of the single path {r['within_1mev']}/{len(cells)}"
        )
    document = {
        "command": "python benchmarks/batched_relaxation.py " + " ".join(os.sys.argv[1:]),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
        "torch_threads": 1,
        "device": args.device,
        "formula": args.formula,
        "optimizer": args.optimizer,
        "load_average": [load_before, os.getloadavg()[0]],
        "rows": rows,
    }
    if args.profile:
        size = max(args.batch_sizes)
        profile = cProfile.Profile()
        profile.runcall(relax_batched, cells, calculator, settings, size)
        path = args.out.with_suffix(".prof")
        profile.dump_stats(path)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        document["profile"] = str(path)
    args.out.write_text(json.dumps(document, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
