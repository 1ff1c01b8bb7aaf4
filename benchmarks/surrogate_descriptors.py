"""Which descriptor of an unrelaxed structure predicts its relaxed enthalpy best?

Held-out, expanding-window test on existing M3GNet search archives, pooled per composition: the relaxed
candidates of all runs of one composition in commit (``finished_at``) order; candidate k is predicted from
candidates 1..k-1 only, exactly what the engine's surrogate would have seen before relaxing it. For every
descriptor the same GP (surrogates/gp.py, engine settings) and a 5-nearest-neighbour baseline (on
standardised descriptors, distance-weighted) are scored, next to the running mean of all earlier
enthalpies; the raw single-point M3GNet energy of the unrelaxed structure is also scored as a ranking on
its own (no training). Reported per composition and descriptor:

* MAE of the predicted relaxed enthalpy per atom;
* calibration of the GP's sigma: fraction of errors within 1 and 2 sigma (68% / 95% if Gaussian);
* Spearman rank correlation between prediction and actual over the held-out points: the acquisition only
  ranks proposals (lowest LCB), so ranking is what matters most;
* cost per structure of each descriptor on this CPU (one torch thread).

Descriptors: ``rdf`` (element-pair RDFs + volume), ``m3gnet_embedding`` (per-element mean of M3GNet's final
atom features), ``m3gnet_energy`` (single-point energy per atom alone), ``m3gnet`` (embedding + energy,
energy column repeated ``--energy-weight`` times; several weights may be given), ``rdf+energy``.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 GLOBOPT_MODELS=../shared/models nice -n 5 \\
        .venv/bin/python benchmarks/surrogate_descriptors.py \\
        --runs 'benchmarks/results/standard/runs/*' 'benchmarks/results/descriptor_data/runs/*'

The standard-suite archives hold only ~12 relaxations each (~70 per composition), so the reported numbers
also use one more random (80) and GA (60) search per composition, seed 10, made from the same configs:

    D=benchmarks/results/descriptor_data; mkdir -p $D
    for sys in TiO2 GaN ZnO SrTiO3; do for mode in random ga; do
      b=80; [ $mode = ga ] && b=60; n=$sys-$mode-s10
      sed -e "s/^name: .*/name: $n/" -e "s/^seed: .*/seed: 10/" -e "s/^  evaluations: .*/  evaluations: $b/" \
        benchmarks/results/standard/runs/$sys-$mode-s0/config.yaml > $D/$n.yaml
      .venv/bin/globopt run $D/$n.yaml --out $D/runs/$n
    done; done

Writes benchmarks/results/surrogate_descriptors.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sqlite3
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np


def load_points(patterns: list[str]) -> dict[str, list[dict]]:
    """Relaxed candidates of every archive matching ``patterns``, grouped by reduced formula, commit order.

    Archives without a ``candidates`` table (the ase-ga baseline runs keep their own database) are skipped.
    """
    from globopt.structure_codec import structure_from_json

    groups: dict[str, list[dict]] = defaultdict(list)
    for pattern in patterns:
        for run_dir in sorted(glob.glob(pattern)):
            path = Path(run_dir) / "archive.sqlite"
            if not path.is_file():
                continue
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            db.row_factory = sqlite3.Row
            try:
                rows = db.execute(
                    "SELECT initial, enthalpy_per_atom, finished_at FROM candidates"
                    " WHERE status='relaxed' ORDER BY finished_at, id"
                ).fetchall()
            except sqlite3.OperationalError:
                rows = []
            db.close()
            for row in rows:
                structure = structure_from_json(row["initial"])
                groups[structure.composition.reduced_formula].append(
                    {
                        "run": Path(run_dir).name,
                        "finished_at": row["finished_at"],
                        "structure": structure,
                        "y": float(row["enthalpy_per_atom"]),
                    }
                )
    for points in groups.values():
        points.sort(key=lambda p: (p["finished_at"], p["run"]))
    return dict(groups)


def describe(points: list[dict], energy_weights: list[int], model: str) -> tuple[dict, dict, np.ndarray]:
    """Descriptor matrices for one composition (one M3GNet pass per structure serves all M3GNet variants).

    Returns ({name: matrix}, {name: seconds per structure}, raw single-point energies per atom).
    """
    from surrogates.descriptors import PairRDFDescriptor
    from surrogates.m3gnet_descriptor import M3GNetDescriptor, m3gnet_output

    structures = [p["structure"] for p in points]
    elements = tuple(sorted({str(el) for s in structures for el in s.composition}))
    rdf = PairRDFDescriptor(elements)
    started = time.perf_counter()
    x_rdf = rdf.many(structures)
    rdf_seconds = (time.perf_counter() - started) / len(structures)
    m3gnet_output(structures[0], model)  # load the model outside the timing
    started = time.perf_counter()
    outputs = [m3gnet_output(s, model) for s in structures]
    m3gnet_seconds = (time.perf_counter() - started) / len(structures)
    energy = np.array([o.energy_per_atom for o in outputs])

    def matrix(descriptor: M3GNetDescriptor) -> np.ndarray:
        return np.vstack([descriptor.from_output(o) for o in outputs])

    x = {
        "rdf": x_rdf,
        "m3gnet_embedding": matrix(M3GNetDescriptor(elements, model, energy_weight=0)),
        "m3gnet_energy": matrix(M3GNetDescriptor(elements, model, features=False, energy_weight=1)),
        "rdf+energy": np.hstack([x_rdf, np.round(energy, 5)[:, None]]),
    }
    for weight in energy_weights:
        x[f"m3gnet(w={weight})"] = matrix(M3GNetDescriptor(elements, model, energy_weight=weight))
    cost = {name: m3gnet_seconds for name in x}
    cost["rdf"] = rdf_seconds
    cost["rdf+energy"] = rdf_seconds + m3gnet_seconds
    return x, cost, energy


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def expanding_window(x: np.ndarray, y: np.ndarray, start: int, min_points: int) -> dict:
    """GP and 5-NN predictions of y[k] from the first k points, for k >= start."""
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from surrogates.gp import GPSettings, GPSurrogate

    gp = GPSurrogate(GPSettings(min_points=min_points))
    mu, sigma, knn = [], [], []
    for k in range(len(y)):
        if k >= start:
            m, s = gp.predict(x[k : k + 1])
            mu.append(m[0])
            sigma.append(s[0])
            model = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=5, weights="distance"))
            knn.append(model.fit(x[:k], y[:k]).predict(x[k : k + 1])[0])
        gp.add(x[k], y[k])
    return {"mu": np.array(mu), "sigma": np.array(sigma), "knn": np.array(knn)}


def scores(prediction: np.ndarray, actual: np.ndarray, sigma: np.ndarray | None = None) -> dict:
    errors = np.abs(prediction - actual)
    result = {"mae": float(errors.mean()), "spearman": spearman(prediction, actual)}
    if sigma is not None:
        result |= {
            "within_1_sigma": float(np.mean(errors <= sigma)),
            "within_2_sigma": float(np.mean(errors <= 2 * sigma)),
            "mean_sigma": float(sigma.mean()),
        }
    return result


def paired_difference(errors: np.ndarray, reference: np.ndarray, seed: int = 0) -> dict:
    """Mean of |error| minus the reference descriptor's on the same points, with a 95% bootstrap interval.

    Both descriptors predict the same held-out candidates, so the paired difference removes the (large)
    point-to-point variation that makes two separate MAEs hard to compare.
    """
    diff = np.abs(errors) - np.abs(reference)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (2000, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci95": [float(low), float(high)]}


def markdown(report: dict) -> str:
    lines = [
        "| composition (n test) | descriptor | GP MAE | GP within 1σ / 2σ | GP Spearman | 5-NN MAE "
        "| GP MAE − rdf's [95% CI] | 5-NN Spearman | ms/structure |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for formula, block in report["compositions"].items():
        head = f"{formula} ({block['n_test']})"
        base = block["running_mean"]
        lines.append(f"| {head} | running mean | {base['mae']:.3f} | - | - | - | - | - | - |")
        raw = block["single_point_energy_raw"]
        lines.append(f"| {head} | raw single-point energy | - | - | {raw['spearman']:.2f} | - | - | - | - |")
        for name, row in block["descriptors"].items():
            gp, knn, diff = row["gp"], row["knn5"], row["gp_abs_error_minus_rdf"]
            lines.append(
                f"| {head} | {name} | {gp['mae']:.3f} "
                f"| {gp['within_1_sigma']:.0%} / {gp['within_2_sigma']:.0%} "
                f"| {gp['spearman']:.2f} | {knn['mae']:.3f} "
                f"| {diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}] "
                f"| {knn['spearman']:.2f} "
                f"| {1000 * row['seconds_per_structure']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["benchmarks/results/standard/runs/*", "benchmarks/results/descriptor_data/runs/*"],
        help="glob patterns of run directories (each with archive.sqlite)",
    )
    parser.add_argument("--start", type=int, default=10, help="training points before the first test")
    parser.add_argument("--min-points", type=int, default=6, help="GP min_points (engine default)")
    parser.add_argument("--energy-weight", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--model", default="M3GNet-MP-2021.2.8-PES")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "surrogate_descriptors.json"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    groups = load_points(args.runs)
    report: dict = {
        "command": " ".join(["benchmarks/surrogate_descriptors.py", *sys.argv[1:]]),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        "1 torch thread",
        "model": args.model,
        "compositions": {},
    }
    for formula, points in sorted(groups.items()):
        y = np.array([p["y"] for p in points])
        if len(y) <= args.start + 5:
            continue
        x, cost, energy = describe(points, args.energy_weight, args.model)
        actual = y[args.start :]
        running_mean = np.array([y[:k].mean() for k in range(args.start, len(y))])
        block: dict = {
            "n_points": len(y),
            "n_test": len(actual),
            "actual": actual.tolist(),
            "runs": sorted({p["run"] for p in points}),
            "energy_spread": float(y.std()),
            "mean_atoms": float(np.mean([len(p["structure"]) for p in points])),
            "running_mean": scores(running_mean, actual),
            "single_point_energy_raw": {"spearman": spearman(energy[args.start :], actual)},
            "descriptors": {},
        }
        windows = {
            name: expanding_window(matrix, y, args.start, args.min_points) for name, matrix in x.items()
        }
        for name, window in windows.items():
            block["descriptors"][name] = {
                "size": int(x[name].shape[1]),
                "seconds_per_structure": cost[name],
                "gp": scores(window["mu"], actual, window["sigma"]),
                "knn5": scores(window["knn"], actual),
                "gp_abs_error_minus_rdf": paired_difference(
                    window["mu"] - actual, windows["rdf"]["mu"] - actual
                ),
                "gp_mu": window["mu"].tolist(),
                "gp_sigma": window["sigma"].tolist(),
            }
            print(f"{formula} {name}: GP {block['descriptors'][name]['gp']}", flush=True)
        report["compositions"][formula] = block
    report["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
