"""What a variable-composition run hands the user: hull.csv, stable/*.cif, hull.png and status lines.

Everything is derived from the archive (plus the supplied entries), so it is rewritten during the run (at
most every ``interval`` seconds, when a result changed the hull), at the end of every session and by
``globopt report``, on a finished, killed or running run. The observer also keeps a running hull of its
own, fed from the commits, to log each change of the stable set as it happens.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any

from pymatgen.core import Composition

from globopt.archive import Archive
from globopt.candidate import Evaluation, Status
from globopt.hull.analysis import HullAnalysis, HullPoint
from globopt.hull.starts import given_entries
from globopt.hull.tracker import HullTracker
from globopt.observers import BestSoFar, CommitContext, CommitObserver
from globopt.rundir import replace_cif_folder

log = logging.getLogger("globopt")

HULL_COLUMNS = [
    "composition",
    "formation_energy_per_atom",
    "e_above_hull",
    "spacegroup",
    "id",
    "stable",
    "enthalpy_per_atom",
    "n_atoms",
    "formula",
    "origin",
]


class HullOutputs(CommitObserver):
    """hull.csv and stable/ during the run, those and hull.png at the end; a log line per hull change."""

    label = "hull outputs"

    def __init__(self, run_path: Path, config: Any, interval: float = 30.0) -> None:
        self.run_path = run_path
        self.config = config
        self.interval = interval
        self.tracker = HullTracker(config.chemical_system, given_entries(config))
        self._stable: list[str] = []
        self._written_at = -float("inf")
        self._stale = False

    def run_started(self, archive: Archive, best: BestSoFar | None, done: int, total: int) -> None:
        for record in archive.unique_minima():
            self.tracker.add(record.formula, record.enthalpy_per_atom, record.id)
        self._stable = self._stable_formulas()

    def after_commit(self, evaluation: Evaluation, context: CommitContext) -> None:
        if evaluation.status is not Status.RELAXED or evaluation.relaxed is None:
            return
        formula = evaluation.relaxed.composition.formula.replace(" ", "")
        if not self.tracker.add(formula, evaluation.enthalpy_per_atom, evaluation.candidate_id):
            return
        self._stale = True
        stable = self._stable_formulas()
        if stable != self._stable:
            log.info(
                "hull: %d stable (%s) after candidate %d (%s)",
                len(stable), " ".join(stable), evaluation.candidate_id,
                evaluation.relaxed.composition.reduced_formula,
            )  # fmt: skip
            self._stable = stable
        if time.monotonic() - self._written_at >= self.interval:
            self._write(context.archive, plots=False)

    def run_finished(self, archive: Archive, interrupted: bool) -> None:
        self._write(archive, plots=True)
        stable = self._stable_formulas()
        if stable:
            log.info(
                "hull: %d stable phases (%s); see %s and %s",
                len(stable), " ".join(stable), self.run_path / "hull.csv", self.run_path / "stable",
            )  # fmt: skip

    def _write(self, archive: Archive, plots: bool) -> None:
        # a failure here must not hide the run's own outcome: the archive holds everything
        try:
            write_hull_outputs(self.run_path, archive, self.config, plots=plots)
        except Exception:
            log.exception("could not write the hull outputs; `globopt report %s` retries", self.run_path)
        self._written_at, self._stale = time.monotonic(), False

    def _stable_formulas(self) -> list[str]:
        return [formula for formula, _, _ in self.tracker.stable()]


def write_hull_outputs(run_path: Path, archive: Archive, config: Any, plots: bool = True) -> list[Path]:
    """hull.csv, stable/ and (``plots``) hull.png in the run directory; returns the files written."""
    analysis = HullAnalysis(archive, config.chemical_system, given_entries(config))
    files = [write_hull_csv(run_path / "hull.csv", analysis)]
    files += write_stable(run_path / "stable", archive, analysis, config.hull.stable_threshold)
    if plots and analysis.diagram is not None:
        plot = write_hull_plot(run_path / "hull.png", analysis)
        if plot is not None:
            files.append(plot)
    return files


def write_hull_csv(path: Path, analysis: HullAnalysis) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HULL_COLUMNS)
        for p in analysis.points:
            writer.writerow(
                [
                    p.composition, f"{p.formation_energy_per_atom:.6f}", f"{p.e_above_hull:.6f}",
                    p.spacegroup or "", "" if p.candidate_id is None else p.candidate_id, int(p.stable),
                    f"{p.enthalpy_per_atom:.6f}", p.n_atoms, p.formula, p.origin,
                ]
            )  # fmt: skip
    os.replace(tmp, path)
    return path


def _cif_name(point: HullPoint) -> str:
    group = (point.spacegroup or "P1").replace("/", "_")
    return f"{point.composition}_{group}_id{point.candidate_id}.cif"


def write_stable(folder: Path, archive: Archive, analysis: HullAnalysis, threshold: float) -> list[Path]:
    """Replace stable/ with CIFs of the run's structures within ``threshold`` of the hull."""
    named = [(_cif_name(point), point.candidate_id) for point in analysis.near(threshold)]
    return replace_cif_folder(folder, archive, named)


def write_hull_plot(path: Path, analysis: HullAnalysis) -> Path | None:
    """Formation energy against composition for a binary, pymatgen's ternary plot for three elements."""
    import matplotlib

    matplotlib.use("Agg")
    from globopt.htvs.output import _ternary_plot

    elements = analysis.elements
    if len(elements) > 3:
        return None
    try:
        if len(elements) == 2:
            _binary_plot(analysis, path)
        else:
            _ternary_plot(analysis.diagram, path)
    except Exception as exc:  # a plot is a convenience: never lose hull.csv over it
        log.warning("hull plot failed: %s", exc)
        return None
    return path


def _binary_plot(analysis: HullAnalysis, path: Path) -> None:
    """Formation enthalpy against the second element's fraction, zoomed on the hull: a search relaxes many
    structures far above it, which would otherwise squash the hull into a line (EMT's Cu-Au hull is 0.01
    eV/atom deep, its random structures lie up to 0.4 above)."""
    import matplotlib.pyplot as plt

    first, second = analysis.elements
    deepest = min(p.formation_energy_per_atom for p in analysis.points)
    window = max(0.05, 0.5 * abs(deepest))
    shown = [p for p in analysis.points if p.e_above_hull <= window]
    x_of = {p.composition: Composition(p.composition).get_atomic_fraction(second) for p in analysis.points}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    stable = sorted(analysis.stable, key=lambda p: x_of[p.composition])
    ax.plot([x_of[p.composition] for p in stable], [p.formation_energy_per_atom for p in stable], "-",
            color="C3", lw=1.2, label="convex hull")  # fmt: skip
    above = [p for p in shown if not p.stable]
    ax.scatter([x_of[p.composition] for p in above], [p.formation_energy_per_atom for p in above], s=16,
               color="C0", alpha=0.6, label=f"within {window:.2f} eV/atom of the hull")  # fmt: skip
    ax.scatter([x_of[p.composition] for p in stable], [p.formation_energy_per_atom for p in stable], s=34,
               color="C3", zorder=3, label="stable")  # fmt: skip
    for p in stable:
        if 0 < x_of[p.composition] < 1:
            ax.annotate(p.composition, (x_of[p.composition], p.formation_energy_per_atom), fontsize=7,
                        xytext=(2, -11), textcoords="offset points")  # fmt: skip
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel(f"x in {first}(1-x){second}(x)")
    ax.set_ylabel("formation enthalpy (eV/atom)")
    hidden = len(analysis.points) - len(shown)
    ax.set_title(
        f"{first}-{second}: {len(analysis.points)} structures"
        + (f", {hidden} above the window" if hidden else "")
    )
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hull_status_lines(archive: Archive, config: Any) -> list[str]:
    """`globopt status` of a variable-composition run: the stable set so far."""
    analysis = HullAnalysis(archive, config.chemical_system, given_entries(config))
    tried = {r.formula for r in archive.used_potential()}
    compositions = {Composition(f).reduced_formula for f in tried}
    lines = [f"compositions relaxed: {len(compositions)}"]
    if analysis.diagram is None:
        return [*lines, f"no hull yet: no relaxed structure of {', '.join(analysis.missing)}"]
    threshold = config.hull.stable_threshold
    near = [p for p in analysis.near(threshold) if not p.stable]
    lines.append(
        f"stable phases ({len(analysis.stable)}; formation enthalpy eV/atom; "
        f"{len(near)} more within {threshold:g} eV/atom of the hull in stable/):"
    )
    for p in analysis.stable:
        source = f"id={p.candidate_id}" if p.candidate_id is not None else p.origin
        lines.append(
            f"  {p.composition:10s} {p.formation_energy_per_atom:8.4f}  {p.spacegroup or '?':10s} "
            f"{p.n_atoms:3d} atoms  {source}"
        )
    return lines


def hull_report_lines(archive: Archive, config: Any) -> list[str]:
    """The report's markdown table of the stable phases (instead of the lowest enthalpies per atom)."""
    analysis = HullAnalysis(archive, config.chemical_system, given_entries(config))
    if analysis.diagram is None:
        return []
    lines = [
        "## Stable phases",
        "",
        "| composition | formation enthalpy (eV/atom) | space group | atoms | id | origin |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in analysis.stable:
        candidate = "" if p.candidate_id is None else p.candidate_id
        lines.append(
            f"| {p.composition} | {p.formation_energy_per_atom:.4f} | {p.spacegroup or '?'} | {p.n_atoms} "
            f"| {candidate} | {p.origin} |"
        )
    threshold = config.hull.stable_threshold
    near = len([p for p in analysis.near(threshold) if not p.stable])
    return [
        *lines,
        "",
        f"{near} more structures within {threshold:g} eV/atom of the hull: hull.csv, stable/",
        "",
    ]
