"""How much of a binary system's convex hull a variable-composition search recovers, against the alternative
a user has without it: one fixed-composition run per stoichiometry with the same total budget.

    GLOBOPT_MODELS=../shared/models .venv/bin/python benchmarks/hull_search.py \\
        --systems Al-Ni Ti-Al --seeds 0 1 2 3 --budget 200 --methods ga random fixed

The reference hull is benchmarks/hull_references.py's (textbook prototypes of the system's compounds relaxed
with the same potential; computed first if its JSON is missing). Its stable compounds whose primitive cell
fits in ``--atoms`` are the targets. A target is *recovered* by the first relaxation of a run that either
matches its structure (pymatgen StructureMatcher, default tolerances) or reaches its composition at or below
its energy (+ ``--tolerance``, the difference between the run's fmax 0.05 and the reference's 0.01).

Methods, each with ``--budget`` relaxations per seed:

* ``ga`` / ``random``: one run with ``chemical_system`` and ``atoms: [1, --atoms]`` (the two elemental
  references are its first two relaxations);
* ``fixed``: the two elemental references (counted, not rerun), then one fixed-composition GA run
  (population 4, so it breeds within its share) per composition of the same space (every reduced
  composition with a cell of at most ``--atoms`` atoms, all its formula units), the rest of the budget
  split evenly between them. Its relaxations are counted as if the runs took turns, one relaxation each:
  a target found at the k-th relaxation of its composition's run counts as found after about
  k x (number of runs) relaxations.

All runs of one invocation share a process, so the potential is loaded once; CPU seconds are the process's
(time.process_time) per run. Results: benchmarks/results/hull_search/<system>.json and summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import yaml
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure

HERE = Path(__file__).resolve().parent
POTENTIAL = {"kind": "matgl", "model": "M3GNet-MP-2021.2.8-PES"}


@dataclass
class Target:
    label: str
    formula: str
    energy_per_atom: float
    structure: Structure


@dataclass
class Relaxation:
    """One committed relaxation of a run, in commit order."""

    formula: str
    energy_per_atom: float | None
    structure: Structure | None
    origin: str


def targets(system: str, max_atoms: int, refresh: bool) -> tuple[list[Target], list[str], dict]:
    """Reachable stable compounds of the reference hull, the unreachable ones, and the reference JSON."""
    path = HERE / "results" / "hull_references" / f"{system}_m3gnet.json"
    if refresh or not path.is_file():
        import subprocess
        import sys

        subprocess.run(
            [
                sys.executable,
                str(HERE / "hull_references.py"),
                "--systems",
                system,
                "--max-atoms",
                str(max_atoms),
            ],
            check=True,
        )
    from hull_references import stable_phases

    reference = json.loads(path.read_text())
    reachable, unreachable = [], []
    for phase in stable_phases(reference):
        if phase["primitive_atoms"] <= max_atoms:
            structure = Structure.from_dict(phase["structure"])
            reachable.append(Target(phase["label"], phase["formula"], phase["energy_per_atom"], structure))
        else:
            unreachable.append(f"{phase['label']} ({phase['primitive_atoms']} atoms)")
    return reachable, unreachable, reference


def committed_relaxations(run: Path) -> list[Relaxation]:
    """Every relaxation of a run (statuses that used the potential), in the order they were committed."""
    from globopt.archive import Archive

    archive = Archive(run / "archive.sqlite")
    try:
        records = sorted(archive.used_potential(), key=lambda r: (r.finished_at, r.id))
        return [
            Relaxation(
                Composition(r.formula).reduced_formula,
                r.enthalpy_per_atom if r.status == "relaxed" else None,
                r.relaxed if r.status == "relaxed" else None,
                r.origin,
            )
            for r in records
        ]
    finally:
        archive.close()


def first_hits(relaxations: list[Relaxation], goals: list[Target], tolerance: float) -> dict[str, int | None]:
    """Target label -> 1-based index of the relaxation that recovered it (None: not recovered)."""
    matcher = StructureMatcher()
    hits: dict[str, int | None] = {t.label: None for t in goals}
    for index, relaxation in enumerate(relaxations, start=1):
        if relaxation.energy_per_atom is None:
            continue
        for target in goals:
            if hits[target.label] is not None or relaxation.formula != target.formula:
                continue
            low_enough = relaxation.energy_per_atom <= target.energy_per_atom + tolerance
            if low_enough or matcher.fit(relaxation.structure, target.structure):
                hits[target.label] = index
    return hits


def run_config(path: Path, out: Path, config: dict) -> float:
    """Run one config in this process; returns its CPU seconds."""
    from globopt.cli import main

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.process_time()
    code = main(
        ["run", str(path), "--out", str(out)] + (["--resume"] if (out / "archive.sqlite").exists() else [])
    )
    if code != 0:
        raise RuntimeError(f"{path}: globopt run exited with {code}")
    return time.process_time() - started


def variable_run(system: str, method: str, seed: int, budget: int, max_atoms: int, folder: Path) -> dict:
    name = f"{system}_{method}_s{seed}"
    config = {
        "name": name, "mode": method, "chemical_system": system.split("-"), "atoms": [1, max_atoms],
        "seed": seed, "potential": POTENTIAL, "budget": {"evaluations": budget},
    }  # fmt: skip
    cpu = run_config(folder / f"{name}.yaml", folder / name, config)
    relaxations = committed_relaxations(folder / name)
    return {"runs": [name], "cpu_seconds": cpu, "relaxations": relaxations, "interleave": 1}


def fixed_runs(system: str, seed: int, budget: int, max_atoms: int, folder: Path) -> dict:
    """Elemental references, then one fixed-composition GA per composition of the space, taking turns."""
    from globopt.config import parse_config
    from globopt.hull.settings import space_from_config

    elements = system.split("-")
    space_config = {
        "name": "space", "mode": "ga", "chemical_system": elements, "atoms": [1, max_atoms],
        "potential": POTENTIAL,
    }  # fmt: skip
    space = space_from_config(parse_config(space_config))
    compounds = [f for f in space.compositions if len(Composition(f).elements) > 1]
    share, extra = divmod(budget - len(elements), len(compounds))
    cpu, names = 0.0, []
    per_run: list[list[Relaxation]] = []
    # the elemental references (the first two relaxations of a variable-composition run) are needed by
    # both; they recover no compound, so they enter here as two relaxations of budget
    reference_runs = [Relaxation(element, None, None, f"reference:{element}") for element in elements]
    for index, formula in enumerate(compounds):
        reduced = Composition(formula)
        largest = max_atoms // int(reduced.num_atoms)
        name = f"{system}_fixed_s{seed}_{formula}"
        config = {
            "name": name, "mode": "ga", "composition": formula, "formula_units": [1, largest], "seed": seed,
            "potential": POTENTIAL, "budget": {"evaluations": share + (1 if index < extra else 0)},
            "ga": {"population_size": 4, "initial_random": 4},
        }  # fmt: skip
        cpu += run_config(folder / f"{name}.yaml", folder / name, config)
        per_run.append(committed_relaxations(folder / name))
        names.append(name)
    # take turns: round k of every run after the other, so the k-th relaxation of a run is about the
    # (k x runs)-th relaxation overall
    interleaved = list(reference_runs)
    for k in range(max(len(r) for r in per_run)):
        interleaved += [r[k] for r in per_run if k < len(r)]
    return {"runs": names, "cpu_seconds": cpu, "relaxations": interleaved, "interleave": len(per_run)}


def summarise(results: dict, goals: list[Target], budget: int) -> list[str]:
    lines = [
        f"| method | recovered (of {len(goals)}) per seed | mean | relaxations to recover, median per target "
        f"| CPU s per run (mean) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, seeds in results.items():
        counts = [sum(h is not None for h in s["hits"].values()) for s in seeds]
        medians = []
        for target in goals:
            found = [s["hits"][target.label] for s in seeds if s["hits"][target.label] is not None]
            text = f"{statistics.median(found):.0f}" if found else "-"
            medians.append(f"{target.formula} {text} ({len(found)}/{len(seeds)})")
        cpu = statistics.mean(s["cpu_seconds"] for s in seeds)
        per_seed = " ".join(map(str, counts))
        lines.append(
            f"| {method} | {per_seed} | {statistics.mean(counts):.2f} | {'; '.join(medians)} | {cpu:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", nargs="+", default=["Al-Ni", "Ti-Al"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--budget", type=int, default=200, help="relaxations per seed and method")
    parser.add_argument("--atoms", type=int, default=8, help="largest cell")
    parser.add_argument(
        "--methods", nargs="+", default=["ga", "random", "fixed"], choices=["ga", "random", "fixed"]
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.002, help="eV/atom above a target that still counts"
    )
    parser.add_argument("--refresh-references", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "hull_search")
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(HERE))
    args.out.mkdir(parents=True, exist_ok=True)
    report = [
        f"# Variable-composition search: {args.budget} relaxations per seed, cells up to {args.atoms} atoms",
        "",
    ]
    for system in args.systems:
        goals, unreachable, _ = targets(system, args.atoms, args.refresh_references)
        print(
            f"{system}: targets {[t.label for t in goals]}; beyond {args.atoms} atoms: {unreachable}",
            flush=True,
        )
        results: dict[str, list[dict]] = {}
        load = [os.getloadavg()[0]]
        for method in args.methods:
            for seed in args.seeds:
                folder = args.out / system
                folder.mkdir(parents=True, exist_ok=True)
                if method == "fixed":
                    outcome = fixed_runs(system, seed, args.budget, args.atoms, folder)
                else:
                    outcome = variable_run(system, method, seed, args.budget, args.atoms, folder)
                hits = first_hits(outcome["relaxations"], goals, args.tolerance)
                load.append(os.getloadavg()[0])
                entry = {
                    "seed": seed, "hits": hits, "cpu_seconds": outcome["cpu_seconds"],
                    "relaxations": len(outcome["relaxations"]), "runs": outcome["runs"],
                }  # fmt: skip
                results.setdefault(method, []).append(entry)
                print(f"  {method} seed {seed}: {hits} CPU {outcome['cpu_seconds']:.0f} s", flush=True)
                summary = {
                    "system": system, "budget": args.budget, "atoms": args.atoms, "tolerance": args.tolerance,
                    "targets": [{"label": t.label, "formula": t.formula, "energy_per_atom": t.energy_per_atom}
                                for t in goals],
                    "unreachable": unreachable, "results": results, "load_average": load,
                }  # fmt: skip
                (args.out / f"{system}.json").write_text(json.dumps(summary, indent=1))
        report += [f"## {system}", "", f"targets: {', '.join(t.label for t in goals)}; "
                   f"beyond {args.atoms} atoms: {', '.join(unreachable) or 'none'}; "
                   f"load average {min(load):.1f}-{max(load):.1f}", ""]  # fmt: skip
        report += [*summarise(results, goals, args.budget), ""]
        (args.out / "summary.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
