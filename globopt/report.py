"""Summaries of a run directory: `globopt status` (text) and `globopt report` (plots + markdown).

Both read only the archive, so they work on a finished run, a killed run, or one still running.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

from globopt.archive import Archive, CandidateRecord
from globopt.candidate import Status
from globopt.rundir import RunDirectory, RunDirError


def open_for_reading(path: Path) -> tuple[RunDirectory, Archive]:
    run = RunDirectory(path)
    if not run.archive_path.exists():
        raise RunDirError(f"{path} is not a globopt run directory (no archive.sqlite)")
    return run, run.open_archive()


def status_text(path: Path, n_best: int = 5) -> str:
    run, archive = open_for_reading(path)
    try:
        from globopt.config import load_config

        config = load_config(run.config_path)
        counts = archive.count_by_status()
        used = archive.count_used_potential()
        lines = [
            f"run {config.name}: mode={config.mode} composition={config.formula}"
            f" potential={config.potential.kind}:{config.potential.model}",
            f"evaluations: {used}/{config.budget.evaluations}"
            + ("  (finished)" if used >= config.budget.evaluations and not counts.get("pending") else ""),
            "by status: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
        ]
        if config.mode == "htvs":  # a screen ranks by stability, not by energy per atom across chemistries
            from globopt.htvs.output import screen_status_lines

            return "\n".join(lines + screen_status_lines(archive, config, n_best))
        if config.chemical_system is not None:  # stability across compositions, not energy per atom
            from globopt.hull.output import hull_status_lines

            return "\n".join(lines + hull_status_lines(archive, config))
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
        return "\n".join(lines)
    finally:
        archive.close()


def write_report(path: Path, out: Path | None = None) -> list[Path]:
    """Convergence and energy-distribution plots plus a markdown summary; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, archive = open_for_reading(path)
    out = out or (path / "report")
    out.mkdir(parents=True, exist_ok=True)
    try:
        evaluated = list(archive.used_potential())
        energies = [
            (i + 1, r.enthalpy_per_atom) for i, r in enumerate(evaluated) if r.status == Status.RELAXED
        ]
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
        fig.savefig(plot, dpi=120)
        plt.close(fig)
        files.append(plot)
        summary = out / "summary.md"
        seconds = [r.seconds for r in evaluated if r.seconds]
        potential = [r.potential_seconds for r in evaluated if r.potential_seconds]
        text = ["# Run report", "", "```", status_text(path, n_best=10), "```", ""]
        if seconds:
            text += [
                f"- relaxations: {len(seconds)}, mean {sum(seconds) / len(seconds):.2f} s each",
                f"- time inside the potential: {sum(potential) / sum(seconds):.0%} of relaxation time",
                "",
            ]
        text += ["![convergence and energy distribution](convergence.png)", ""]
        text += _stable_phases(path, archive) or best_candidates_table(archive, n_best=10)
        text += origin_table(evaluated)
        screen_files = _screen_outputs(path, archive)
        hull_plots = [f for f in screen_files if f.suffix == ".png"]
        if hull_plots:
            text += ["## Convex hull", ""]
            text += [f"![{f.stem}]({os.path.relpath(f, out)})" for f in hull_plots] + [""]
        summary.write_text("\n".join(text))
        files.append(summary)
        files += screen_files
        return files
    finally:
        archive.close()


def _stable_phases(path: Path, archive: Archive) -> list[str]:
    """A chemical system's stable phases (its lowest enthalpies per atom would mean nothing)."""
    from globopt.config import load_config

    config = load_config(path / "config.yaml")
    if config.chemical_system is None:
        return []
    from globopt.hull.output import hull_report_lines

    return hull_report_lines(archive, config)


def _screen_outputs(path: Path, archive: Archive) -> list[Path]:
    """An htvs run's ranked.csv, stable/ and hull plots, regenerated from the archive."""
    from globopt.config import load_config

    config = load_config(path / "config.yaml")
    if config.chemical_system is not None:
        from globopt.hull.output import write_hull_outputs

        return write_hull_outputs(path, archive, config)
    if config.mode != "htvs":
        return []
    from globopt.htvs.output import write_screen_outputs

    return write_screen_outputs(path, archive, config)


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
