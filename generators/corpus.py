"""A training corpus collected from run directories: the relaxed minima the engine itself produced.

A generator can only propose structure types it has seen. The public training sets (MP-20 and the like)
are not always at hand, but every screen and search leaves relaxed minima in its archive, all from one
potential. A corpus is those minima, filtered the way a training set should be:

* converged relaxations only (``relaxed``; unconverged ones are not minima), one row per minimum (the
  engine's duplicate verdicts, then StructureMatcher across runs, keeping the lower energy);
* within ``window`` eV/atom of the lowest energy found for their composition, so the model learns the
  low-lying structures of a composition rather than every basin a screen touched;
* an energy above the corpus's own convex hull per row (every row's chemical system, built from the rows
  themselves: the runs' elemental references make the end points);
* a train / val / test split by structure type: whole templates (AFLOW prototypes) go to one split, so
  the test rows measure how a model generalises to structure types it has never seen. Rows from searches
  (no template) and elemental references always train.

The written data set is the CDVAE csv layout (``material_id``, ``cif``, properties) that ``globopt
generator train`` and ``evaluate`` read, plus provenance columns and a manifest describing how it was made.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure

from globopt.htvs.hull import SubsystemHulls, parse_origin
from globopt.report import open_for_reading
from globopt.rundir import atomic_write

CORPUS_FORMAT = 1
COLUMNS = (
    "material_id", "cif", "formula", "n_atoms", "energy_per_atom", "e_above_composition_min", "e_above_hull",
    "spacegroup", "structure_type", "substitution", "source_run", "source_id", "split",
)  # fmt: skip
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
# rows whose structure type is not a template: they never go to a held-out split
UNTYPED = ("search", "element", "competing")


class CorpusError(ValueError):
    """The corpus cannot be built as asked; the message names the run or folder and what to do."""


@dataclass
class CorpusRow:
    structure: Structure
    formula: str  # reduced formula
    energy_per_atom: float
    spacegroup: str
    structure_type: str  # the template (AFLOW label), or search / element:<El> / competing:<name>
    substitution: str
    source_run: str
    source_id: int
    e_above_composition_min: float = 0.0
    e_above_hull: float | None = None
    split: str = "train"


@dataclass
class CorpusSummary:
    name: str
    folder: str
    potential: str
    window_ev_per_atom: float
    runs: list[dict] = field(default_factory=list)
    candidates_read: int = 0
    dropped_above_window: int = 0
    dropped_as_duplicates: int = 0
    dropped_too_large: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    elements: list[str] = field(default_factory=list)
    structure_types: dict[str, list[str]] = field(default_factory=dict)
    on_hull: int = 0


def structure_type_of(origin: str) -> tuple[str, str]:
    """(structure type, substitution) from an archive origin, read with the screen's own parser."""
    kind, name, substitution = parse_origin(origin)
    if kind == "htvs":
        return name, substitution.split(" ")[0]
    if kind == "reference":
        return f"element:{name}", ""
    if kind == "competing":
        return f"competing:{name}", ""
    return "search", ""


def split_of(structure_type: str, seed: int, test: float, val: float, held_out: Sequence[str]) -> str:
    """Split of a whole structure type: fixed by a hash of its name, so adding runs never moves a type."""
    if structure_type in held_out:
        return "test"
    if structure_type.partition(":")[0] in UNTYPED:
        return "train"
    digest = hashlib.sha256(f"{seed}|{structure_type}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def collect_corpus(
    runs: Sequence[Path],
    out: Path,
    *,
    name: str = "corpus",
    window: float = 0.1,
    max_atoms: int | None = 20,
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    held_out: Sequence[str] = (),
    seed: int = 0,
    echo=print,
) -> CorpusSummary:
    """Read the runs, filter and split their minima, and write the corpus folder ``out``."""
    if not runs:
        raise CorpusError("give at least one run directory to collect from")
    if window < 0 or not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1 - test_fraction:
        raise CorpusError("--window must be >= 0 and the test + val fractions below 1")
    _check_output_folder(out)
    summary = CorpusSummary(name, str(out), "", window)
    rows = _read_runs(runs, summary, max_atoms, echo)
    rows = _within_window(rows, window, summary)
    rows = _unique(rows, summary)
    _place_on_hull(rows, summary)
    for row in rows:
        row.split = split_of(row.structure_type, seed, test_fraction, val_fraction, held_out)
    unknown = sorted(set(held_out) - {row.structure_type for row in rows})
    if unknown:
        raise CorpusError(
            f"--hold-out names structure types no row has: {', '.join(unknown)} (types are template names "
            f"as in ranked.csv, e.g. AB_cF8_225_a_b)"
        )
    rows.sort(key=lambda r: (r.formula, r.energy_per_atom, r.source_run, r.source_id))
    _write(rows, out, summary, seed, test_fraction, val_fraction, held_out)
    return summary


def _check_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} is a file; give a folder for the corpus")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise CorpusError(
            f"--out {out} holds other files and no corpus manifest; give a new or empty folder (a corpus "
            f"folder is rewritten, anything else is left alone)"
        )


def _read_runs(runs: Sequence[Path], summary: CorpusSummary, max_atoms: int | None, echo) -> list[CorpusRow]:
    rows: list[CorpusRow] = []
    potentials: dict[str, str] = {}
    for path in runs:
        read = open_for_reading(Path(path))
        try:
            label = read.config.potential.label
            potentials[str(path)] = label
            taken = 0
            for record in read.archive.unique_minima():
                summary.candidates_read += 1
                if max_atoms is not None and record.n_atoms > max_atoms:
                    summary.dropped_too_large += 1
                    continue
                structure = record.relaxed  # unique_minima(): relaxed candidates only
                energy = record.energy_per_atom
                if structure is None or energy is None:
                    continue
                structure_type, substitution = structure_type_of(record.origin)
                rows.append(
                    CorpusRow(
                        structure, Composition(record.formula).reduced_formula, float(energy),
                        record.spacegroup or "", structure_type, substitution, Path(path).name, record.id,
                    )
                )  # fmt: skip
                taken += 1
            summary.runs.append(
                {"path": str(path), "mode": read.config.mode, "potential": label, "minima": taken}
            )
            echo(f"{path}: {taken} relaxed minima ({read.config.mode}, {label})")
        finally:
            read.close()
    if len(set(potentials.values())) > 1:
        listed = "; ".join(f"{p}: {label}" for p, label in potentials.items())
        raise CorpusError(
            f"the runs used different potentials ({listed}); energies of one corpus must come from one "
            f"potential, so collect each potential's runs into a corpus of its own"
        )
    summary.potential = next(iter(potentials.values()))
    return rows


def _within_window(rows: list[CorpusRow], window: float, summary: CorpusSummary) -> list[CorpusRow]:
    lowest: dict[str, float] = {}
    for row in rows:
        lowest[row.formula] = min(lowest.get(row.formula, row.energy_per_atom), row.energy_per_atom)
    kept = []
    for row in rows:
        row.e_above_composition_min = row.energy_per_atom - lowest[row.formula]
        if row.e_above_composition_min <= window + 1e-9:
            kept.append(row)
        else:
            summary.dropped_above_window += 1
    return kept


def _unique(rows: list[CorpusRow], summary: CorpusSummary) -> list[CorpusRow]:
    """One row per minimum, across runs and templates: two templates can relax into one structure (a
    decorated fcc template and the element's reference, say), which a run's own verdicts may not merge."""
    matcher = StructureMatcher()  # pymatgen's defaults: ltol 0.2, stol 0.3, angle_tol 5
    by_formula: dict[str, list[CorpusRow]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.energy_per_atom):
        by_formula[row.formula].append(row)
    kept = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group in by_formula.values():
            unique: list[CorpusRow] = []
            for row in group:  # lowest energy first, so the kept copy of a minimum is its lowest
                if any(matcher.fit(other.structure, row.structure) for other in unique):
                    summary.dropped_as_duplicates += 1
                else:
                    unique.append(row)
            kept.extend(unique)
    return kept


def _place_on_hull(rows: list[CorpusRow], summary: CorpusSummary) -> None:
    entries = [PDEntry(r.structure.composition, r.energy_per_atom * len(r.structure)) for r in rows]
    hulls = SubsystemHulls(entries)
    diagrams: dict[frozenset[str], PhaseDiagram | str] = {}
    for row, entry in zip(rows, entries, strict=True):
        elements = frozenset(el.symbol for el in entry.composition.elements)
        if elements not in diagrams:
            diagrams[elements] = hulls.hull(elements)
        diagram = diagrams[elements]
        if isinstance(diagram, PhaseDiagram):  # otherwise an element has no reference: no hull position
            row.e_above_hull = float(diagram.get_e_above_hull(entry))
            summary.on_hull += row.e_above_hull < 1e-6


def _write(
    rows: list[CorpusRow],
    out: Path,
    summary: CorpusSummary,
    seed: int,
    test_fraction: float,
    val_fraction: float,
    held_out: Sequence[str],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    every = []
    for index, row in enumerate(rows):
        record = {
            "material_id": f"{summary.name}-{index}",
            "cif": row.structure.to(fmt="cif"),
            "formula": row.formula,
            "n_atoms": len(row.structure),
            "energy_per_atom": f"{row.energy_per_atom:.6f}",
            "e_above_composition_min": f"{row.e_above_composition_min:.6f}",
            "e_above_hull": "" if row.e_above_hull is None else f"{row.e_above_hull:.6f}",
            "spacegroup": row.spacegroup,
            "structure_type": row.structure_type,
            "substitution": row.substitution,
            "source_run": row.source_run,
            "source_id": row.source_id,
            "split": row.split,
        }
        every.append(record)
        by_split[row.split].append(record)
    for split, records in by_split.items():
        _write_csv(out / f"{split}.csv", records)
    _write_csv(out / "corpus.csv", every)
    summary.rows = {"all": len(rows), **{s: len(r) for s, r in by_split.items()}}
    summary.elements = sorted({el.symbol for r in rows for el in r.structure.composition.elements})
    types: dict[str, set[str]] = {s: set() for s in SPLITS}
    for row in rows:
        if row.structure_type.partition(":")[0] not in UNTYPED:
            types[row.split].add(row.structure_type)
    summary.structure_types = {s: sorted(t) for s, t in types.items()}
    manifest = {
        "format": CORPUS_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "split": {"seed": seed, "test_fraction": test_fraction, "val_fraction": val_fraction,
                  "held_out": list(held_out), "by": "structure type (template)"},
        **asdict(summary),
    }  # fmt: skip
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2))


def _write_csv(path: Path, records: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(records)
    atomic_write(path, text.getvalue())
