"""Summaries of a run directory: `globopt status` (text) and `globopt report` (plots + markdown).

Both only read the archive (a read-only SQLite connection), so they work on a finished run, a killed run,
one still running, and a run on read-only media. They write only what is missing or asked for: a deleted
results.csv or best/ (where the directory is writable and no process writes the run) and the report.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from globopt.archive import Archive, CandidateRecord
from globopt.candidate import Status
from globopt.config import HTVS_UNLIMITED_BUDGET, RunConfig
from globopt.rundir import UNKNOWN_WRITER, RunDirectory, RunDirError


@dataclass
class ReadRun:
    """A run directory opened only for reading: its archive (read-only), its config and who writes it."""

    run: RunDirectory
    archive: Archive
    config: RunConfig
    config_note: str  # '' when the config is the archive's own copy
    writer: str | None  # 'pid N on HOST' while a process writes the run, else None

    def close(self) -> None:
        self.archive.close()


def open_for_reading(path: Path) -> ReadRun:
    """Open a run without writing to it: works on finished, killed and running runs, and read-only media."""
    run = RunDirectory(path)
    if not path.is_dir():
        raise RunDirError(f"there is no run directory {path}")
    if not run.archive_path.exists():
        left = sorted(p.name for p in path.iterdir())
        raise RunDirError(
            f"{path} has no archive.sqlite, so there is no run to read"
            + (
                f" (it holds {', '.join(left[:6])}; if the archive was moved or deleted, restore it)"
                if left
                else ""
            )
        )
    archive = run.open_archive(read_only=True)
    try:
        config, note = run.read_config(archive)
    except BaseException:
        archive.close()
        raise
    return ReadRun(run, archive, config, note, run.writer())


def status_text(path: Path, n_best: int = 5) -> str:
    read = open_for_reading(path)
    try:
        return "\n".join(_status_lines(read, n_best))
    finally:
        read.close()


def _status_lines(read: ReadRun, n_best: int) -> list[str]:
    config, archive = read.config, read.archive
    counts = archive.count_by_status()
    used = archive.count_used_potential()
    lines = [
        f"run {config.name}: mode={config.mode} composition={config.formula} "
        f"potential={config.potential.label}",
        f"state: {run_state(read, used, counts.get('pending', 0))}",
        f"evaluations: {_evaluations_text(config, used)}",
        "by status: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no candidate yet"),
    ]
    if read.config_note:
        lines.append(f"note: {read.config_note}")
    lost = read.run.lost_commits(archive)
    if lost:
        lines.append(f"warning: {read.run.lost_commits_message(lost)}")
    lines += restore_derived_outputs(read)
    if config.mode == "htvs":  # a screen ranks by stability, not by energy per atom across chemistries
        from globopt.htvs.output import screen_status_lines

        try:
            return lines + screen_status_lines(archive, config, n_best)
        except ValueError as exc:  # a competing-phase entries file that no longer reads
            raise RunDirError(str(exc)) from None
    if config.chemical_system is not None:  # stability across compositions, not energy per atom
        from globopt.hull.output import hull_status_lines

        return lines + hull_status_lines(archive, config)
    best = archive.best_unique(n_best)
    if best:
        lines.append("best unique structures (enthalpy per atom):")
        for rank, row in enumerate(best, 1):
            lines.append(
                f"  {rank}. id={row.id:<5} {row.enthalpy_per_atom:.4f} eV/atom  "
                f"{row.spacegroup or '?':10s} {row.formula}  ({row.origin})"
            )
    else:
        lines.append("no relaxed structure yet")
    return lines


def _evaluations_text(config: RunConfig, used: int) -> str:
    budget = config.budget.evaluations
    if budget >= HTVS_UNLIMITED_BUDGET:
        return f"{used} (budget: the whole enumeration)"
    if used > budget:
        return f"{used} committed; budget.evaluations is {budget} (lowered after they were committed)"
    return f"{used}/{budget}"


def run_state(read: ReadRun, used: int, pending: int) -> str:
    """Running, or why not and what a resume would do: from the lock (held only by a live writer)."""
    resume = f"`globopt resume {read.run.path}`"
    if read.writer is not None and read.writer.startswith(UNKNOWN_WRITER):
        return read.writer
    if read.writer is not None:
        return f"running ({read.writer})"
    if pending:
        return (
            f"not running: {pending} candidate(s) in flight when it stopped (killed or interrupted) will be "
            f"re-issued by {resume}"
        )
    budget = read.config.budget
    if used >= budget.evaluations:
        return "finished (budget spent)"
    best = read.archive.best_unique(1)
    target = budget.target_enthalpy_per_atom
    if target is not None and best and best[0].enthalpy_per_atom <= target:
        return "finished (target enthalpy reached)"
    if budget.force_calls is not None and read.archive.count_force_calls() >= budget.force_calls:
        return "finished (force-call budget spent)"
    if read.config.mode == "htvs" and used:
        return f"not running: stopped before the end of the enumeration, or finished it; {resume} continues"
    return f"not running: stopped before its budget; {resume} continues it"


def restore_derived_outputs(read: ReadRun) -> list[str]:
    """Regenerate a missing results.csv or best/ from the archive, where that is safe; say what happened.

    Only when no process writes the run (it rewrites them itself at its end) and the directory is
    writable; the run's lock is held meanwhile, so no run can start writing beside it.
    """
    run, archive = read.run, read.archive
    missing = []
    if not run.results_path.exists():
        missing.append("results.csv")
    writes_best = read.config.chemical_system is None  # a chemical system writes stable/ instead
    if writes_best and not run.best_path.exists() and archive.best_unique(1):
        missing.append("best/")
    if not missing:
        return []
    names = " and ".join(missing)
    if read.writer is not None:
        return [f"{names} missing: the running process writes them at its end"]
    if not os.access(run.path, os.W_OK):
        return [
            f"{names} missing and not regenerated: {run.path} is read-only (a resume, or `globopt report` on "
            f"a writable copy, regenerates them from the archive)"
        ]
    try:
        run.acquire_lock()
    except RunDirError:
        return [f"{names} missing: a process started writing the run; it regenerates them"]
    try:
        run.rewrite_results(archive, read.config.objectives)
        if "best/" in missing:
            run.write_best(archive, read.config.output.n_best)
    except OSError as exc:
        return [f"{names} missing and could not be regenerated ({exc})"]
    finally:
        run.release_lock()
    return [f"{names} {'were' if len(missing) > 1 else 'was'} missing: regenerated from the archive"]


def write_report(path: Path, out: Path | None = None) -> list[Path]:
    """Convergence and energy-distribution plots plus a markdown summary; returns the files written.

    Reads the run without writing to it; the report goes to ``out`` (default RUN/report). A screen's
    ranked.csv, stable/ and hull/ are regenerated in the run directory when it is writable and no process
    writes it, otherwise into ``out``.
    """
    read = open_for_reading(path)
    out = out or (path / "report")
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
            files = _write_report_files(read, out)
        except OSError as exc:
            raise RunDirError(
                f"cannot write the report into {out} ({exc}); the run itself is untouched. Give a writable "
                f"folder with --out"
            ) from None
        return files
    finally:
        read.close()


def _write_report_files(read: ReadRun, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archive = read.archive
    evaluated = list(archive.used_potential())
    energies = [(i + 1, r.enthalpy_per_atom) for i, r in enumerate(evaluated) if r.status == Status.RELAXED]
    files = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if energies:
        xs = [x for x, _ in energies]
        ys = [y for _, y in energies]
        running, best = [], math.inf
        for y in ys:
            best = min(best, y)
            running.append(best)
        ax1.scatter(xs, ys, s=10, alpha=0.5, label="relaxed candidate")
        ax1.step(xs, running, where="post", color="C3", label="best so far")
        low = min(ys)
        ax1.set_ylim(low - 0.05, min(max(ys), low + 1.5) + 0.05)
        ax2.hist([y - low for y in ys if y - low < 2.0], bins=40)
    ax1.set_xlabel("evaluation")
    ax1.set_ylabel("enthalpy (eV/atom)")
    ax1.set_title("convergence")
    ax1.legend(loc="upper right")
    ax2.set_xlabel("enthalpy above best (eV/atom)")
    ax2.set_ylabel("candidates")
    ax2.set_title("energy distribution")
    fig.tight_layout()
    plot = out / "convergence.png"
    staging = out / "convergence.tmp.png"
    try:
        fig.savefig(staging, dpi=120)
    finally:
        plt.close(fig)
    os.replace(staging, plot)  # a report killed half-way leaves the previous plot, never half of one
    files.append(plot)
    seconds = [r.seconds for r in evaluated if r.seconds]
    potential = [r.potential_seconds for r in evaluated if r.potential_seconds]
    text = ["# Run report", "", "```", *_status_lines(read, n_best=10), "```", ""]
    if seconds:
        text += [
            f"- relaxations: {len(seconds)}, mean {sum(seconds) / len(seconds):.2f} s each",
            f"- time inside the potential: {sum(potential) / sum(seconds):.0%} of relaxation time",
            "",
        ]
    text += ["![convergence and energy distribution](convergence.png)", ""]
    text += _stable_phases(read) or best_candidates_table(archive, n_best=10)
    text += origin_table(evaluated)
    screen_files = _screen_outputs(read, out)
    hull_plots = [f for f in screen_files if f.suffix == ".png"]
    if hull_plots:
        text += ["## Convex hull", ""]
        text += [f"![{f.stem}]({os.path.relpath(f, out)})" for f in hull_plots] + [""]
    summary = out / "summary.md"
    _atomic_text(summary, "\n".join(text))
    files.append(summary)
    files += screen_files
    return files


def _atomic_text(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)


def _stable_phases(read: ReadRun) -> list[str]:
    """A chemical system's stable phases (its lowest enthalpies per atom would mean nothing)."""
    if read.config.chemical_system is None:
        return []
    from globopt.hull.output import hull_report_lines

    return hull_report_lines(read.archive, read.config)


def _screen_outputs(read: ReadRun, out: Path) -> list[Path]:
    """A screen's ranked.csv, stable/ and hull plots, or a chemical system's hull.csv, stable/ and hull.png,
    regenerated from the archive.

    Into the run directory when it is writable and no process writes it (holding the lock meanwhile),
    otherwise into the report's folder, so that reading a run never writes where a run is working.
    """
    if read.config.chemical_system is not None:
        from globopt.hull.output import write_hull_outputs as write_outputs
    elif read.config.mode == "htvs":
        from globopt.htvs.output import write_screen_outputs as write_outputs
    else:
        return []
    run = read.run
    try:
        if read.writer is None and os.access(run.path, os.W_OK):
            try:
                run.acquire_lock()
            except RunDirError:
                pass
            else:
                try:
                    return write_outputs(run.path, read.archive, read.config)
                finally:
                    run.release_lock()
        return write_outputs(out, read.archive, read.config)
    except ValueError as exc:  # a competing-phase entries file that no longer reads
        raise RunDirError(str(exc)) from None


def best_candidates_table(archive: Archive, n_best: int) -> list[str]:
    """Markdown table of the lowest unique minima: energy, symmetry and conventional lattice parameters.

    Why the conventional cell: the archive stores whatever cell the search produced (often a skewed
    primitive or a supercell); a materials scientist compares a, b, c, alpha, beta, gamma of the
    standard conventional setting with the literature.
    """
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    rows = archive.best_unique(n_best)
    if not rows:
        return []
    lowest = rows[0].enthalpy_per_atom
    lines = [
        "## Best unique structures",
        "",
        "| rank | id | formula | H (eV/atom) | +meV/atom | space group | a, b, c (Å) "
        "| alpha, beta, gamma (°) | V/atom (Å^3) | density (g/cm^3) | origin |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rank, row in enumerate(rows, start=1):
        structure = row.relaxed
        try:
            cell = SpacegroupAnalyzer(structure, symprec=0.1).get_conventional_standard_structure()
        except Exception:  # spglib gives up on badly distorted cells: show the cell as stored
            cell = structure
        a, b, c = cell.lattice.abc
        alpha, beta, gamma = cell.lattice.angles
        group = f"{row.spacegroup} ({row.spacegroup_number})" if row.spacegroup else "?"
        lines.append(
            f"| {rank} | {row.id} | {structure.composition.reduced_formula} ({len(structure)} atoms) "
            f"| {row.enthalpy_per_atom:.4f} | {1000 * (row.enthalpy_per_atom - lowest):.1f} | {group} "
            f"| {a:.3f}, {b:.3f}, {c:.3f} | {alpha:.1f}, {beta:.1f}, {gamma:.1f} "
            f"| {structure.volume / len(structure):.2f} | {structure.density:.3f} | {row.origin} |"
        )
    return [*lines, ""]


def origin_table(evaluated: list[CandidateRecord]) -> list[str]:
    """Which sources (random, heredity, strain, ...) produced relaxations and new best-so-far structures."""
    if not evaluated:
        return []
    used, relaxed, improved = Counter(), Counter(), Counter()
    best = math.inf
    for row in evaluated:
        origin = re.sub(r":sg\d+$", "", row.origin)  # random draws: one row, not one per space group
        used[origin] += 1
        if row.status == Status.RELAXED:
            relaxed[origin] += 1
            if row.enthalpy_per_atom < best - 1e-4:
                best = row.enthalpy_per_atom
                improved[origin] += 1
    lines = [
        "## Where the evaluations came from",
        "",
        "| origin | evaluations | relaxed | new best-so-far |",
        "| --- | --- | --- | --- |",
    ]
    for origin, count in used.most_common():
        lines.append(f"| {origin} | {count} | {relaxed[origin]} | {improved[origin]} |")
    failures = Counter(r.status for r in evaluated if r.status != Status.RELAXED)
    if failures:
        lines += ["", "Failed relaxations: " + ", ".join(f"{k} {v}" for k, v in sorted(failures.items()))]
    return [*lines, ""]
