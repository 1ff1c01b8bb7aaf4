"""Cost of the GP surrogate per engine step as the archive grows, and its accuracy against sklearn baselines.

Data: ``--points`` Cu2Au2 cells (fcc sites, random species order, strain and displacements) with their
EMT energies per atom (a real potential; the timing does not depend on which one). For each archive size
n the script measures, with one torch thread, what one engine step costs the master:

* condition: posterior update after one new point (no hyperparameter fit);
* predict: mean and sigma for ``--candidates`` proposals (plus describing them);
* fit: one hyperparameter refit at n points, amortised over the refit interval of the default schedule
  (max(refit_every, refit_growth * n) new points).

With ``--stall-window A B`` it also grows one GP from A to B points, one point and one ranking per step as in
the engine, once with the refit in the master's thread and once in the background (gp.py,
``background_refit``), and reports the longest step, where the master sits still while every worker
waits for work, and the window's total time.

Compare the per-step sum with the time of one relaxation (M3GNet: ~1 s for 6-8 atoms on one core, see
benchmarks/results/surrogate_value.json). Accuracy on the held-out tail of the data is reported for the GP
and for scikit-learn baselines (predict the mean; k-nearest neighbours on the same descriptors).

    OPENBLAS_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/surrogate_timing.py --sizes 500 2000 5000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from ase.calculators.emt import EMT
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor

from surrogates.descriptors import PairRDFDescriptor
from surrogates.gp import GPSettings, GPSurrogate, fit_sizes


def cuau_cells(count: int, seed: int) -> list[Structure]:
    rng = np.random.default_rng(seed)
    sites = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cells = []
    while len(cells) < count:
        lattice = Lattice(3.9 * (np.eye(3) + rng.normal(0, 0.08, (3, 3))))
        species = list(rng.permutation(["Cu", "Cu", "Au", "Au"]))
        structure = Structure(lattice, species, sites + rng.normal(0, 0.07, (4, 3)))
        if structure.distance_matrix[np.triu_indices(4, 1)].min() > 2.1:
            cells.append(structure)
    return cells


def emt_energies(structures: list[Structure]) -> np.ndarray:
    calculator = EMT()
    energies = []
    for structure in structures:
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = calculator
        energies.append(atoms.get_potential_energy() / len(atoms))
    return np.array(energies)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[500, 2000, 5000])
    parser.add_argument("--test", type=int, default=300, help="held-out structures for the accuracy check")
    parser.add_argument("--candidates", type=int, default=6, help="proposals ranked per step")
    parser.add_argument("--steps", type=int, default=5, help="steps averaged per size")
    parser.add_argument(
        "--stall-window", nargs=2, type=int, metavar=("FROM", "TO"), help="also time the longest master step"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "surrogate_timing.json"
    )
    args = parser.parse_args()

    import torch
    from sklearn.neighbors import KNeighborsRegressor

    torch.set_num_threads(1)
    biggest = max([*args.sizes, *(args.stall_window or [])]) + args.steps
    structures = cuau_cells(biggest + args.test, seed=0)
    describe = PairRDFDescriptor(("Cu", "Au"))
    started = time.perf_counter()
    x = describe.many(structures)
    describe_ms = (time.perf_counter() - started) / len(structures) * 1e3
    y = emt_energies(structures)
    x_test, y_test = x[-args.test :], y[-args.test :]
    defaults = GPSettings()
    rows = []
    for size in args.sizes:
        gp = GPSurrogate(GPSettings())
        for row, energy in zip(x[:size], y[:size], strict=True):
            gp.add(row, energy)
        started = time.perf_counter()
        mu, sigma = gp.predict(x_test)
        first = time.perf_counter() - started
        fit_seconds = gp.timings.fit
        condition, predict = [], []
        for step in range(args.steps):
            gp.add(x[size + step], y[size + step])
            started = time.perf_counter()
            gp.predict(x_test[: args.candidates])
            total = time.perf_counter() - started
            condition.append(gp.timings.condition)
            predict.append(total - gp.timings.condition)
        fitted = fit_sizes(defaults, size)
        interval = max(defaults.refit_every, int(np.ceil(fitted * defaults.refit_growth)))
        knn = KNeighborsRegressor(n_neighbors=5, weights="distance").fit(x[:size], y[:size])
        errors = mu - y_test
        row = {
            "points": size,
            "sparse": gp.sparse,
            "fit_seconds": fit_seconds,
            "refit_interval_points": interval,
            "condition_seconds_per_step": float(np.mean(condition)),
            "predict_seconds_per_step": float(np.mean(predict)),
            "describe_seconds_per_step": describe_ms * args.candidates / 1e3,
            "amortised_fit_seconds_per_step": fit_seconds / interval,
            "first_predict_seconds": first,
            "gp_mae_ev_per_atom": float(np.abs(errors).mean()),
            "gp_within_1_sigma": float(np.mean(np.abs(errors) <= sigma)),
            "gp_within_2_sigma": float(np.mean(np.abs(errors) <= 2 * sigma)),
            "mean_baseline_mae_ev_per_atom": float(np.abs(y[:size].mean() - y_test).mean()),
            "knn_mae_ev_per_atom": float(np.abs(knn.predict(x_test) - y_test).mean()),
        }
        row["total_seconds_per_step"] = (
            row["condition_seconds_per_step"]
            + row["predict_seconds_per_step"]
            + row["describe_seconds_per_step"]
            + row["amortised_fit_seconds_per_step"]
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    stalls = []
    if args.stall_window:
        for background in (False, True):
            stalls.append(master_stall(x, y, x_test[: args.candidates], *args.stall_window, background))
            print(json.dumps(stalls[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(["benchmarks/surrogate_timing.py", *sys.argv[1:]]),
                "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
                "descriptor_ms_per_structure": describe_ms,
                "gp_defaults": defaults.__dict__,
                "rows": rows,
                "master_stall": stalls,
            },
            indent=2,
        )
    )


def master_stall(x, y, candidates, start: int, stop: int, background: bool) -> dict:
    """Grow a GP from ``start`` to ``stop`` points as the engine does and time each step on the master."""
    gp = GPSurrogate(GPSettings(background_refit=background))
    for row, energy in zip(x[:start], y[:start], strict=True):
        gp.add(row, energy)
    gp.predict(candidates)  # the first fit is always in the master's thread; not part of the window
    steps = []
    window_started = time.perf_counter()
    for k in range(start, stop):
        started = time.perf_counter()
        gp.add(x[k], y[k])
        gp.predict(candidates)
        steps.append(time.perf_counter() - started)
    window = time.perf_counter() - window_started
    gp.wait_for_refit()
    return {
        "background_refit": background,
        "points": [start, stop],
        "refits_in_window": fit_sizes(GPSettings(), stop - 1) != fit_sizes(GPSettings(), start),
        "background_fits_installed": gp.timings.background_fits,
        "longest_step_seconds": max(steps),
        "median_step_seconds": float(np.median(steps)),
        "window_seconds": window,
    }


if __name__ == "__main__":
    main()
