"""Run every (structure, mode, seed) of a suite and collect per-run results.

Each globopt search goes through the normal engine into its own run directory under ``OUT/runs/``, so a
benchmark run is made of ordinary, inspectable, resumable runs: `globopt report OUT/runs/NaCl-ga-s0` works,
and re-running the same benchmark command resumes unfinished searches and reuses finished ones.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from globopt.scoreboard.hits import EvaluatedStructure, FirstHit, first_hit, origin_class, total_force_calls
from globopt.scoreboard.jobs import SearchJob, globopt_config

log = logging.getLogger("globopt.scoreboard")


def run_jobs(jobs: list[SearchJob], n_parallel: int) -> Iterator[dict[str, Any]]:
    """Results in completion order; in-process for one job at a time (one model load for all searches)."""
    if n_parallel <= 1:
        for job in jobs:
            yield run_search(job)
        return
    with multiprocessing.get_context("spawn").Pool(n_parallel) as pool:
        yield from pool.imap_unordered(run_search, jobs)


def run_search(job: SearchJob) -> dict[str, Any]:
    import torch

    torch.set_num_threads(job.torch_threads)
    started = time.perf_counter()
    if job.mode == "ase-ga":
        from globopt.scoreboard.ase_ga_baseline import run_ase_ga

        evaluations, start_time, best = run_ase_ga(job)
    else:
        evaluations, start_time, best = _run_globopt(job)
    reference = Structure.from_dict(job.reference)
    hit = first_hit(evaluations, reference, job.reference_energy, job.hit_tolerance, start_time)
    return _result(job, hit, evaluations, best, time.perf_counter() - started)


def _result(
    job: SearchJob,
    hit: FirstHit | None,
    evaluations: list[EvaluatedStructure],
    best: float | None,
    wall: float,
) -> dict[str, Any]:
    """One search's record. Everything in it is recomputed from the run directory on every benchmark call,
    so a finished run from an older release gains the newer fields without being searched again."""
    timed = [e.seconds for e in evaluations if e.seconds is not None]
    return {
        "entry": job.entry,
        "mode": job.mode,
        "seed": job.seed,
        "budget": job.budget,
        "evaluations": len(evaluations),
        "hit": hit is not None,
        "evaluations_to_hit": hit.evaluations if hit else None,
        "seconds_to_hit": hit.seconds if hit else None,
        # potential calls summed over the relaxations up to and including the first hit, and over the run:
        # the cost measure that does not depend on the machine or on how many searches share it
        "force_calls_to_hit": hit.force_calls if hit else None,
        "force_calls_total": total_force_calls(evaluations),
        "hit_origin": hit.origin if hit else None,
        "hit_origin_class": origin_class(hit.origin) if hit else None,
        # wall time of the relaxations alone (None where not recorded): what a relaxation of this size costs
        "relaxation_seconds_total": sum(timed) if timed and len(timed) == len(evaluations) else None,
        "best_energy_per_atom": best,
        "reference_energy_per_atom": job.reference_energy,
        "wall_seconds": wall,
        "run_dir": job.run_dir,
    }


def _run_globopt(job: SearchJob) -> tuple[list[EvaluatedStructure], float, float | None]:
    """Run (or resume, or reuse) the search's run directory, then read its evaluations back."""
    from globopt.candidate import Status
    from globopt.config import parse_config
    from globopt.pipeline import build_engine
    from globopt.progress import Progress
    from globopt.rundir import RunDirectory

    path = Path(job.run_dir)
    run = RunDirectory(path)
    if not _finished(run, job.budget, job.stop_at_energy):
        # a finished search is only read back: its stored config may predate newer config keys
        config = parse_config(globopt_config(job), source=f"benchmark search {job.label}")
        if run.archive_path.exists():
            run, config = RunDirectory.open_existing(path, config)
        else:
            run = RunDirectory.create(path, config)
        try:
            summary = build_engine(config, run, Progress(False)).run()
        finally:
            run.release_lock()
        if summary.interrupted:
            raise KeyboardInterrupt(f"benchmark search {job.label} interrupted")
    archive = run.open_archive()
    try:
        used = tuple(s.value for s in Status if s.used_potential)
        rows = [r for r in archive.records() if r.status in used]
        started = min((r.created_at for r in archive.records()), default=time.time())
        # n_force_calls NULL (a worker that died mid-relaxation reports none) counts as 0, as in the
        # archive's own force-call budget (Archive.count_force_calls)
        evaluations = [
            EvaluatedStructure(
                r.relaxed if r.status == Status.RELAXED else None,
                r.enthalpy_per_atom if r.status == Status.RELAXED else None,
                r.finished_at,
                force_calls=r.n_force_calls or 0,
                origin=r.origin,
                seconds=r.seconds,
            )
            for r in sorted(rows, key=lambda r: (r.finished_at, r.id))
        ]
    finally:
        archive.close()
    # A run that went further than this benchmark's budget (an earlier call with a larger --budget) is
    # scored on its first `budget` relaxations only, as a search stopped at the budget would have been:
    # its later hits would inflate the success rate.
    evaluations = evaluations[: job.budget]
    energies = [e.energy_per_atom for e in evaluations if e.energy_per_atom is not None]
    return evaluations, started, min(energies) if energies else None


def _finished(run, budget: int, stop_at_energy: float | None) -> bool:
    if not run.archive_path.exists():
        return False
    archive = run.open_archive()
    try:
        if archive.pending_tasks():
            return False
        if archive.count_used_potential() >= budget:
            return True
        best = archive.best_unique(1)
        return stop_at_energy is not None and bool(best) and best[0].enthalpy_per_atom <= stop_at_energy
    finally:
        archive.close()


def job_summary_line(result: dict[str, Any]) -> str:
    calls = result.get("force_calls_to_hit")
    outcome = (
        f"hit at evaluation {result['evaluations_to_hit']} ({result['seconds_to_hit']:.0f} s"
        + (f", {calls} force calls" if calls is not None else "")
        + f", from {result['hit_origin']})"
        if result["hit"]
        else "no hit"
    )
    best = result["best_energy_per_atom"]
    return (
        f"{result['entry']:8s} {result['mode']:6s} seed {result['seed']}: {outcome}; best "
        f"{best:.4f} eV/atom vs reference {result['reference_energy_per_atom']:.4f}"
        if best is not None
        else f"{result['entry']:8s} {result['mode']:6s} seed {result['seed']}: no relaxed structure"
    )
