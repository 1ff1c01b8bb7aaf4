"""Cost of the MPI backend: how much work rank 0 does per evaluation, and how idle the workers are.

Runs ``mpiexec -n RANKS python -m globopt run`` on a generated config and reads the summary line that
globopt/mpi/pool.py logs when it releases the workers. Two uses:

* master throughput: EMT on a tiny cell with many evaluations makes relaxations nearly free, so rank 0's
  own work per evaluation (screening proposals, archive commits, results.csv, the MPI layer) is what
  limits the run; 1 / (that time) is how many evaluations per second rank 0 can feed.
* worker idleness: M3GNet on NaCl shows what fraction of worker time is lost between a result and the
  next task, and how much CPU rank 0 takes from the relaxing ranks.

    .venv/bin/python benchmarks/mpi_overhead.py --potential emt --evaluations 150
    GLOBOPT_MODELS=../shared/models .venv/bin/python benchmarks/mpi_overhead.py --potential m3gnet \\
        --evaluations 20

Writes benchmarks/results/mpi_overhead_<potential>_n<ranks>.json. Other processes on the machine slow
rank 0 down too; the JSON records the load average before and after.
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

SUMMARY = re.compile(
    r"MPI: (?P<evaluations>\d+) evaluations on (?P<workers>\d+) worker rank\(s\) in (?P<wall>[\d.]+) s; "
    r"worker time: relaxing (?P<relaxing>[\d.]+)%, idle between tasks (?P<idle>[\d.]+)%, "
    r"waiting for the end (?P<tail>[\d.]+)%, starting up (?P<startup>[\d.]+)%; "
    r"rank 0 per evaluation: (?P<busy_ms>[\d.]+) ms busy outside collect, (?P<cpu_ms>[\d.]+) ms CPU, "
    r"(?P<mpi_ms>[\d.]+) ms in the MPI layer; rank 0 used (?P<cpu_share>[\d.]+)% of one core"
)

PHASES = re.compile(
    r"rank-0 CPU per evaluation: proposing (?P<proposing>[\d.]+) ms, screening (?P<screening>[\d.]+) ms, "
    r"matching minima (?P<matching_minima>[\d.]+) ms, bookkeeping (?P<bookkeeping>[\d.]+) ms, "
    r"scheduler (?P<scheduler>[\d.]+) ms; observers: .*?; "
    r"(?P<proposals>[\d.]+) proposals per evaluation; "
    r"structures built or prepared ahead on rank 0 (?P<random_here>\d+), "
    r"on workers (?P<random_on_workers>\d+)"
)

POTENTIALS = {
    "emt": {"composition": "Cu2Au2", "potential": {"kind": "emt"}},
    "m3gnet": {"composition": "Na4Cl4", "potential": {"model": "M3GNet-MP-2021.2.8-PES"}},
}


def run(potential: str, ranks: int, evaluations: int, seed: int, flags: list[str]) -> dict:
    mpiexec = shutil.which(
        "mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    if mpiexec is None:
        raise SystemExit("mpiexec not found: pip install mpich")
    with tempfile.TemporaryDirectory(prefix="mpi_overhead_") as folder:
        config = Path(folder) / "bench.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "name": "bench",
                    "seed": seed,
                    "budget": {"evaluations": evaluations},
                    **POTENTIALS[potential],
                }
            )
        )
        out = Path(folder) / "run"
        command = [mpiexec, *flags, "-n", str(ranks), sys.executable, "-m", "globopt", "run", str(config)]
        command += ["--out", str(out)]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        load_before = os.getloadavg()
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        load_after = os.getloadavg()
        log = (out / "globopt.log").read_text() if (out / "globopt.log").exists() else ""
    if result.returncode != 0:
        raise SystemExit(f"globopt failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    match = SUMMARY.search(log)
    if match is None:
        raise SystemExit(f"no MPI summary line in the log:\n{log[-3000:]}")
    numbers = {k: float(v) for k, v in match.groupdict().items()}
    phases = PHASES.search(log)
    phase_ms = {k: float(v) for k, v in phases.groupdict().items()} if phases else {}
    return {
        "potential": potential,
        "composition": POTENTIALS[potential]["composition"],
        "ranks": ranks,
        "evaluations": int(numbers["evaluations"]),
        "mpiexec_wall_s": round(wall, 2),
        "scheduler_wall_s": numbers["wall"],
        "worker_time_share_pct": {
            "relaxing": numbers["relaxing"],
            "idle_between_tasks": numbers["idle"],
            "waiting_for_the_end": numbers["tail"],
            "starting_up": numbers["startup"],
        },
        "rank0_per_evaluation_ms": {
            "busy_outside_collect": numbers["busy_ms"],
            "cpu": numbers["cpu_ms"],
            "mpi_layer": numbers["mpi_ms"],
        },
        # where rank 0's CPU goes (engine.MasterCosts): bookkeeping is archive, results.csv, search state
        # and progress; the search itself is proposing, screening and matching minima
        "rank0_cpu_per_evaluation_by_phase_ms": phase_ms,
        "rank0_bookkeeping_max_evaluations_per_s": round(
            1000 / max(phase_ms.get("bookkeeping", 0) + numbers["mpi_ms"], 1e-9), 1
        )
        if phase_ms
        else None,
        "rank0_cpu_share_of_one_core_pct": numbers["cpu_share"],
        "rank0_max_evaluations_per_s": round(1000 / max(numbers["busy_ms"], 1e-9), 1),
        "rank0_max_evaluations_per_s_cpu": round(1000 / max(numbers["cpu_ms"], 1e-9), 1),
        "mpi_layer_max_evaluations_per_s": round(1000 / max(numbers["mpi_ms"], 1e-9)),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--potential", choices=sorted(POTENTIALS), default="emt")
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--evaluations", type=int, default=150)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--mpiexec-flag", action="append", default=[], help="extra mpiexec flag (repeatable)")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/mpi_overhead_*.json)")
    args = parser.parse_args()
    result = run(args.potential, args.ranks, args.evaluations, args.seed, args.mpiexec_flag)
    out = args.out or REPO / "benchmarks" / "results" / f"mpi_overhead_{args.potential}_n{args.ranks}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
