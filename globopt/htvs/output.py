"""What a screen hands the user: ranked.csv, stable/*.cif and one hull plot per chemical system.

Everything is derived from the archive (plus the config's competing-phase entries), so it is rewritten
at the end of every session and by ``globopt report``, on a finished, killed or still-running screen.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

from globopt.archive import Archive
from globopt.htvs.hull import ScreenedCandidate, StabilityAnalysis
from globopt.observers import CommitObserver
from globopt.rundir import replace_cif_folder

log = logging.getLogger("globopt")

RANKED_COLUMNS = [
    "rank",
    "id",
    "formula",
    "template",
    "substitution",
    "energy_per_atom",
    "formation_energy_per_atom",
    "e_above_hull",
    "spacegroup",
    "status",
    "stable",
    "duplicate_of",
    "note",
]
# Ternary hulls are drawn by pymatgen's plotter; systems with more elements get only ranked.csv rows.
MAX_PLOTTED_ELEMENTS = 3


class ScreenOutputs(CommitObserver):
    """ranked.csv, stable/ and the hull plots, rewritten from the archive at the end of every session."""

    label = "screen outputs"

    def __init__(self, run_path: Path, config) -> None:
        self.run_path = run_path
        self.config = config

    def run_finished(self, archive: Archive, interrupted: bool) -> None:
        # a failure here must not hide the run's own outcome: the archive holds everything
        try:
            write_screen_outputs(self.run_path, archive, self.config)
        except Exception as exc:
            detail = str(exc) if isinstance(exc, OSError | ValueError) else f"{type(exc).__name__}: {exc}"
            self.failure = (
                f"could not write the screen's ranked.csv, stable/ and hull/ ({detail}); every evaluation is "
                f"in the archive: fix the cause and run `globopt report {self.run_path}` to write them"
            )
            log.error("%s", self.failure)
            log.debug("the screen outputs failed here", exc_info=True)


def write_screen_outputs(run_path: Path, archive: Archive, config) -> list[Path]:
    """Write ranked.csv, stable/ and hull/ into ``run_path`` (the run directory, or a report's folder);
    return the files written. A competing-phase entries file that cannot be read is a ValueError naming
    it."""
    entries_files = [Path(p) for p in config.htvs.competing_phases if p.lower().endswith(".json")]
    analysis = StabilityAnalysis(archive, entries_files)
    threshold = config.htvs.stable_threshold
    ranked = analysis.ranked()
    files = [write_ranked(run_path / "ranked.csv", ranked, threshold)]
    files += write_stable(run_path / "stable", archive, ranked, threshold)
    files += write_hull_plots(run_path / "hull", analysis)
    n_stable = sum(1 for c in ranked if _is_stable(c, threshold))
    log.info(
        "screen: %d candidates ranked, %d within %.3f eV/atom of the hull; see %s",
        len(ranked), n_stable, threshold, run_path / "ranked.csv",
    )  # fmt: skip
    return files


def _is_stable(candidate: ScreenedCandidate, threshold: float) -> bool:
    return (
        candidate.status == "relaxed"
        and candidate.duplicate_of is None
        and candidate.e_above_hull is not None
        and candidate.e_above_hull <= threshold
    )


def write_ranked(path: Path, ranked: list[ScreenedCandidate], threshold: float) -> Path:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(RANKED_COLUMNS)
        for rank, c in enumerate(ranked, start=1):
            writer.writerow(
                [
                    rank, c.id, c.formula, c.template, c.substitution, _fmt(c.energy_per_atom),
                    _fmt(c.formation_energy_per_atom), _fmt(c.e_above_hull), c.spacegroup or "", c.status,
                    int(_is_stable(c, threshold)), "" if c.duplicate_of is None else c.duplicate_of, c.note,
                ]
            )  # fmt: skip
    os.replace(tmp, path)
    return path


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def write_stable(
    folder: Path, archive: Archive, ranked: list[ScreenedCandidate], threshold: float
) -> list[Path]:
    """Replace stable/ with CIFs of unique relaxed candidates within ``threshold`` of their hull, named by
    formula, template and id (ranked.csv holds the order)."""
    named = []
    for candidate in ranked:
        if _is_stable(candidate, threshold):
            template = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in candidate.template)
            named.append((f"{candidate.formula}_{template}_id{candidate.id}.cif", candidate.id))
    return replace_cif_folder(folder, archive, named)


def write_hull_plots(folder: Path, analysis: StabilityAnalysis) -> list[Path]:
    """hull/<chemsys>.png for every binary and ternary system holding a ranked candidate."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    # chemsys -> the entries a plot shows; a plot whose entries did not change is not drawn again
    index_path = folder / "plotted.json"
    plotted = json.loads(index_path.read_text()) if index_path.is_file() else {}
    written = []
    for chemsys in analysis.chemical_systems():
        elements = chemsys.split("-")
        if not 2 <= len(elements) <= MAX_PLOTTED_ELEMENTS:
            continue
        diagram = analysis.diagram(chemsys)
        if isinstance(diagram, str):
            continue
        path = folder / f"{chemsys}.png"
        signature = sorted(f"{e.name}:{e.energy:.6f}" for e in diagram.all_entries)
        if path.is_file() and plotted.get(chemsys) == signature:
            written.append(path)
            continue
        plotted.pop(chemsys, None)
        try:
            if len(elements) == 2:
                _binary_plot(diagram, elements, path)
            else:
                _ternary_plot(diagram, path)
        except Exception as exc:  # a plot is a convenience: never lose ranked.csv over it
            log.warning("hull plot of %s failed: %s", chemsys, exc)
            continue
        plotted[chemsys] = signature
        written.append(path)
    tmp = index_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plotted, indent=0))
    os.replace(tmp, index_path)
    return written


def _binary_plot(diagram, elements: list[str], path: Path) -> None:
    """Formation energy per atom against the fraction of the second element, hull drawn through it."""
    import matplotlib.pyplot as plt

    second = elements[1]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    stable = set(diagram.stable_entries)
    points = []
    for entry in diagram.all_entries:
        x = entry.composition.get_atomic_fraction(second)
        y = diagram.get_form_energy_per_atom(entry)
        points.append((x, y, entry in stable, entry.name))
    hull = sorted((x, y) for x, y, on, _ in points if on)
    ax.plot([x for x, _ in hull], [y for _, y in hull], "-", color="C3", lw=1.2, label="convex hull")
    ax.scatter([x for x, _, on, _ in points if not on], [y for _, y, on, _ in points if not on],
               s=18, color="C0", alpha=0.7, label="above hull")  # fmt: skip
    ax.scatter([x for x, _, on, _ in points if on], [y for _, y, on, _ in points if on],
               s=30, color="C3", zorder=3, label="on hull")  # fmt: skip
    for x, y, on, name in points:
        if on and 0 < x < 1:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, -10), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel(f"x in {elements[0]}(1-x){second}(x)")
    ax.set_ylabel("formation energy (eV/atom)")
    ax.set_title(f"{'-'.join(elements)} hull (same potential for all entries)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ternary_plot(diagram, path: Path) -> None:
    import matplotlib.pyplot as plt
    from pymatgen.analysis.phase_diagram import PDPlotter

    plotter = PDPlotter(diagram, backend="matplotlib", show_unstable=0.2)
    ax = plotter.get_plot()
    figure = ax.get_figure() if hasattr(ax, "get_figure") else plt.gcf()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def screen_status_lines(archive: Archive, config, n_best: int) -> list[str]:
    """`globopt status` of a screen: how far the enumeration got and the most stable candidates so far."""
    state = archive.load_state() or {}
    analysis = StabilityAnalysis(
        archive, [Path(p) for p in config.htvs.competing_phases if p.endswith(".json")]
    )
    ranked = [c for c in analysis.ranked() if c.e_above_hull is not None and c.status == "relaxed"]
    lines = [
        f"enumeration: {state.get('proposed', 0)} structures proposed, {state.get('skipped', 0)} skipped by "
        f"filters; {len(analysis.candidates)} substituted candidates archived",
    ]
    if not ranked:
        return [*lines, "no candidate on a hull yet (elemental references come first)"]
    lines.append("most stable candidates (e_above_hull, eV/atom; hulls from what is relaxed so far):")
    for rank, c in enumerate(ranked[:n_best], 1):
        lines.append(
            f"  {rank}. id={c.id:<5} {c.e_above_hull:.4f}  {c.formula:10s} {c.spacegroup or '?':10s} "
            f"{c.template} {c.substitution}"
        )
    return lines
