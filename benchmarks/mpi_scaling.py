"""Scheduler scaling under MPI: worker busy fraction and rank-0 CPU per evaluation, relaxations simulated.

A scheduler benchmark, never a physics result: every relaxation is the latency model of
benchmarks/latency_model.py (a sleep drawn from measured M3GNet relaxation times, returning a real relaxed
structure), so one machine can launch many ranks and what is measured is how well rank 0 keeps them busy.

    .venv/bin/python benchmarks/mpi_scaling.py --case ga --ranks 8 16 32 64 --mean 0.5 2
    .venv/bin/python benchmarks/mpi_scaling.py --case htvs --ranks 4 --mean 0 --evaluations 20000

Cases: ``ga`` (steady-state GA on Na4Cl4, the bundled composition) and ``htvs`` (a substitution screen of
about 25,000 rock-salt, zinc-blende and perovskite cells). Each run writes one JSON record to
benchmarks/results/mpi_scaling.json (appended), with the load average before and after, and prints it.
Ranks poll with short sleeps instead of spinning in MPI receives (globopt/mpi/protocol.py), which is what
lets 64 ranks share 2 cores; ``--spin-check`` measures what a spinning receive would cost instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ELEMENTS = (
    "Li Na K Rb Cs Be Mg Ca Sr Ba Sc Y La Ti Zr Hf V Nb Ta Cr Mo W Mn Fe Co Ni Cu Ag Zn Cd Al Ga In Sn Pb Bi"
)

SUMMARY = re.compile(
    r"MPI: (?P<evaluations>\d+) evaluations on (?P<workers>\d+) worker rank\(s\) in (?P<wall>[\d.]+) s; "
    r"worker time: relaxing (?P<relaxing>[\d.]+)%, idle between tasks (?P<idle>[\d.]+)%, "
    r"waiting for the end (?P<tail>[\d.]+)%, starting up (?P<startup>[\d.]+)%; "
    r"rank 0 per evaluation: (?P<busy_ms>[\d.]+) ms busy outside collect, (?P<cpu_ms>[\d.]+) ms CPU"
)
WINDOW = re.compile(
    r"rank 0: (?P<cpu_ms>[\d.]+) ms CPU per evaluation over evaluations (?P<first>\d+)-(?P<last>\d+)"
    r"(?: \((?P<proposals>[\d.]+) proposals per evaluation\))?"
)


def case_config(case: str, evaluations: int, seed: int) -> dict:
    base = {
        "name": f"scaling_{case}",
        "seed": seed,
        "potential": {"kind": "ase", "calculator": "ase.calculators.emt:EMT"},  # never called
        "relax": {"batch_size": 1},
        "budget": {"evaluations": evaluations},
    }
    if case == "ga":
        return {**base, "mode": "ga", "composition": "Na4Cl4", "ga": {"population_size": 20}}
    metals = ELEMENTS.split()
    return {
        **base,
        "mode": "htvs",
        "htvs": {
            "templates": [
                {"prototype": "rock salt", "name": "rocksalt", "substitutions": {"Na": metals, "Cl": metals}},
                {
                    "prototype": "zincblende",
                    "name": "zincblende",
                    "substitutions": {"Zn": metals, "S": metals},
                },
                {
                    "prototype": "cubic perovskite",
                    "name": "perovskite",
                    "substitutions": {"Ca": metals, "Ti": metals, "O": ["O", "F", "N", "S", "Cl", "Br", "I"]},
                },
            ],
            "keep_original": False,
            "charge_neutral": False,
            "scale_volume": False,
            "elemental_references": False,
        },
    }


def rank_entry(mean: float, argv: list[str]) -> int:
    """What every rank runs: the latency model in place of relaxations, then globopt's own command line.

    The checkout to measure comes first on the path (PYTHONPATH, set by ``run``), this one only after it.
    """
    sys.path.append(str(REPO))
    from benchmarks.latency_model import LatencyModel, install
    from globopt.cli import main

    install(LatencyModel.load(mean))
    return main(argv)


def run(case: str, ranks: int, mean: float, evaluations: int, seed: int, worktree: Path) -> dict:
    mpiexec = shutil.which(
        "mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    if mpiexec is None:
        raise SystemExit("mpiexec not found: pip install mpich")
    with tempfile.TemporaryDirectory(prefix="mpi_scaling_") as folder:
        config = Path(folder) / "bench.yaml"
        config.write_text(yaml.safe_dump(case_config(case, evaluations, seed)))
        out = Path(folder) / "run"
        script = Path(__file__).resolve()
        command = [mpiexec, "-n", str(ranks), sys.executable, str(script), "--rank-entry", str(mean), "--"]
        command += ["run", str(config), "--out", str(out)]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worktree)}
        load_before = os.getloadavg()
        started = time.perf_counter()
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        load_after = os.getloadavg()
        log = (out / "globopt.log").read_text() if (out / "globopt.log").exists() else ""
    if result.returncode != 0:
        raise SystemExit(
            f"globopt failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    match = SUMMARY.search(log)
    if match is None:
        raise SystemExit(f"no MPI summary line in the log:\n{log[-3000:]}")
    n = {k: float(v) for k, v in match.groupdict().items()}
    windows = [
        {
            "evaluations": f"{w['first']}-{w['last']}",
            "rank0_cpu_ms": float(w["cpu_ms"]),
            "proposals_per_evaluation": float(w["proposals"]) if w["proposals"] else None,
        }
        for w in WINDOW.finditer(log)
    ]
    phases = re.search(r"rank-0 CPU per evaluation: (.*)", log)
    return {
        "case": case,
        "ranks": ranks,
        "mean_relaxation_s": mean,
        "evaluations": int(n["evaluations"]),
        "wall_s": round(wall, 1),
        # relaxing / (relaxing + idle between tasks): start-up and the run's last relaxations excluded
        "worker_busy_pct": round(100 * n["relaxing"] / max(n["relaxing"] + n["idle"], 1e-9), 2),
        "worker_time_pct": {
            "relaxing": n["relaxing"],
            "idle_between_tasks": n["idle"],
            "waiting_for_the_end": n["tail"],
            "starting_up": n["startup"],
        },
        "rank0_cpu_ms_per_evaluation": n["cpu_ms"],
        "rank0_cpu_windows": windows,
        "rank0_phases": phases.group(1) if phases else "",
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "code": str(worktree),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def spin_check(ranks: int, seconds: float) -> dict:
    """CPU used by ranks that wait ``seconds`` for a message: blocking receive against globopt's polling."""
    code = r"""
import sys, time, resource
from mpi4py import MPI
comm = MPI.COMM_WORLD
mode, seconds = sys.argv[1], float(sys.argv[2])
if comm.Get_rank() == 0:
    time.sleep(seconds)
    for r in range(1, comm.Get_size()):
        comm.send(None, dest=r)
else:
    if mode == "blocking":
        comm.recv(source=0)
    else:
        delay = 0.0002
        while not comm.iprobe(source=0):
            time.sleep(delay)
            delay = min(2 * delay, 0.005)
        comm.recv(source=0)
u = resource.getrusage(resource.RUSAGE_SELF)
cpu = comm.gather(u.ru_utime + u.ru_stime, root=0)
if comm.Get_rank() == 0:
    print(sum(cpu[1:]) / (len(cpu) - 1))
"""
    mpiexec = shutil.which(
        "mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    out = {}
    for mode in ("blocking", "polling"):
        result = subprocess.run(
            [mpiexec, "-n", str(ranks), sys.executable, "-c", code, mode, str(seconds)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        out[mode] = {
            "waiting_s": seconds,
            "cpu_s_per_waiting_rank": round(float(result.stdout.split()[-1]), 3),
        }
    return {"spin_check": out, "ranks": ranks, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}


def main() -> None:
    if "--rank-entry" in sys.argv:
        index = sys.argv.index("--rank-entry")
        mean = float(sys.argv[index + 1])
        argv = sys.argv[sys.argv.index("--") + 1 :]
        raise SystemExit(rank_entry(mean, argv))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=("ga", "htvs"), default="ga")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8])
    parser.add_argument("--mean", type=float, nargs="+", default=[0.5], help="mean relaxation seconds")
    parser.add_argument("--evaluations", type=int, help="default: 20 relaxations per worker rank")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--worktree", type=Path, default=REPO, help="the globopt checkout to measure")
    parser.add_argument("--spin-check", action="store_true", help="only measure a spinning receive's CPU")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mpi_scaling.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    if args.spin_check:
        records.append(spin_check(max(args.ranks), 10.0))
    else:
        for ranks in args.ranks:
            for mean in args.mean:
                evaluations = args.evaluations or 20 * (ranks - 1)
                records.append(run(args.case, ranks, mean, evaluations, args.seed, args.worktree.resolve()))
                print(json.dumps(records[-1]), flush=True)
    with open(args.out, "a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    if args.spin_check:
        print(json.dumps(records[-1], indent=2))


if __name__ == "__main__":
    main()
