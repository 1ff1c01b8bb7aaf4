"""Summaries of a run directory: `globopt status` (text) and `globopt report` (plots + markdown).

Both read only the archive, so they work on a finished run, a killed run, or one still running.
"""

from __future__ import annotations

import math
from pathlib import Path

from globopt.archive import Archive
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
        best = archive.best_unique(n_best)
        if best:
            lines.append("best unique structures (enthalpy per atom):")
            for rank, row in enumerate(best, 1):
                lines.append(
                    f"  {rank}. id={row['id']:<5} {row['enthalpy_per_atom']:.4f} eV/atom  "
                    f"{row['spacegroup'] or '?':10s} {row['formula']}  ({row['origin']})"
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
        evaluated = [r for r in archive.rows() if Status(r["status"]).used_potential]
        energies = [
            (i + 1, r["enthalpy_per_atom"]) for i, r in enumerate(evaluated) if r["status"] == Status.RELAXED
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
        seconds = [r["seconds"] for r in evaluated if r["seconds"]]
        potential = [r["potential_seconds"] for r in evaluated if r["potential_seconds"]]
        text = ["# Run report", "", "```", status_text(path, n_best=10), "```", ""]
        if seconds:
            text += [
                f"- relaxations: {len(seconds)}, mean {sum(seconds) / len(seconds):.2f} s each",
                f"- time inside the potential: {sum(potential) / sum(seconds):.0%} of relaxation time",
                "",
            ]
        text += ["![convergence](convergence.png)", ""]
        summary.write_text("\n".join(text))
        files.append(summary)
        files += _screen_outputs(path, archive)
        return files
    finally:
        archive.close()


def _screen_outputs(path: Path, archive: Archive) -> list[Path]:
    """An htvs run's ranked.csv, stable/ and hull plots, regenerated from the archive."""
    from globopt.config import load_config

    config = load_config(path / "config.yaml")
    if config.mode != "htvs":
        return []
    from globopt.htvs.output import write_screen_outputs

    return write_screen_outputs(path, archive, config)
