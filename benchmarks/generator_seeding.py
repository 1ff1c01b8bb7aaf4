"""Value of generator seeding: evaluations to the first hit of cubic SrTiO3 (M3GNet), GA with a
generator-seeded first generation versus the GA's usual pyxtal-only first generation.

Same protocol and hit definition as `globopt benchmark` (globopt/benchmark: a relaxed candidate matching the
relaxed reference, or at most 1 meV/atom above its energy); only ``initial_population`` differs between arms.

    GLOBOPT_MODELS=../shared/models .venv/bin/python benchmarks/generator_seeding.py \\
        --cells 5 --seeds 0 1 2 --budget 10 --population 6

Writes benchmarks/results/generator_seeding.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pymatgen.core import Lattice, Structure

from globopt.scoreboard.jobs import SearchJob
from globopt.scoreboard.reference import relax_known
from globopt.scoreboard.runner import run_search

HIT_TOLERANCE = 0.001  # eV/atom


def srtio3(cells: int) -> tuple[dict[str, int], Structure]:
    cubic = Structure(Lattice.cubic(3.905), ["Sr", "Ti", "O", "O", "O"], [
        [0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
    ])  # fmt: skip
    units = cells // 5
    if units > 1:
        cubic.make_supercell([units, 1, 1])
    return {"Sr": units, "Ti": units, "O": 3 * units}, cubic


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", nargs="+", type=int, default=[5, 10], help="atoms per cell (5 or 10)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generator", default="default")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=200, help="reverse-diffusion steps for the seeds")
    parser.add_argument("--model", default="M3GNet-MP-2021.2.8-PES")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "generator_seeding.json"
    )
    args = parser.parse_args()

    results = []
    potential = {"kind": "matgl", "model": args.model}
    folder = Path(tempfile.mkdtemp(prefix="generator_seeding_"))
    for cells in args.cells:
        content, prototype = srtio3(cells)
        reference = relax_known(prototype, "cubic", potential, fmax=0.01, max_steps=1000)
        print(f"reference SrTiO3 ({cells} atoms): {reference.energy_per_atom:.4f} eV/atom", flush=True)
        seeding = {"generator": args.generator, "fraction": args.fraction, "sampling_steps": args.steps}
        for arm in ("pyxtal", "generator"):
            for seed in args.seeds:
                search = {"ga": {"population_size": args.population, "initial_random": args.population}}
                if arm == "generator":
                    search["initial_population"] = seeding
                job = SearchJob(
                    entry=f"SrTiO3-{cells}", mode="ga", seed=seed, budget=args.budget, composition=content,
                    potential=potential, search=search, run_dir=str(folder / f"{cells}-{arm}-{seed}"),
                    reference=reference.structure.as_dict(), reference_energy=reference.energy_per_atom,
                    hit_tolerance=HIT_TOLERANCE,
                    stop_at_energy=reference.energy_per_atom + HIT_TOLERANCE,  # at the first energy hit
                )  # fmt: skip
                outcome = {**run_search(job), "arm": arm, "system": f"SrTiO3-{cells}"}
                results.append(outcome)
                print(json.dumps(outcome), flush=True)
    table = []
    for cells in args.cells:
        for arm in ("pyxtal", "generator"):
            runs = [r for r in results if r["system"] == f"SrTiO3-{cells}" and r["arm"] == arm]
            hits = [r["evaluations_to_hit"] for r in runs if r["hit"]]
            table.append({
                "system": f"SrTiO3-{cells}", "arm": arm, "runs": len(runs), "hits": len(hits),
                "evaluations_to_hit": [r["evaluations_to_hit"] for r in runs],
                "median_evaluations_to_hit": statistics.median(hits) if hits else None,
            })  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "table": table,
                                    "runs": results}, indent=2))  # fmt: skip
    print(
        f"| system | first generation | hits (budget {args.budget}) | evaluations to hit per seed | median |"
    )
    print("| --- | --- | --- | --- | --- |")
    for row in table:
        per_seed = ", ".join("-" if e is None else str(e) for e in row["evaluations_to_hit"])
        median = row["median_evaluations_to_hit"]
        median_text = "-" if median is None else f"{median:g}"
        print(
            f"| {row['system']} | {row['arm']} | {row['hits']}/{row['runs']} | {per_seed} | {median_text} |"
        )


if __name__ == "__main__":
    main()
