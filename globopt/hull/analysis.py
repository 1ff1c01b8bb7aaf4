"""The convex hull of a variable-composition run, built from its archive (for outputs, status, report).

Every unique relaxed minimum of the run is a point (a structure found twice is the same minimum: its lowest
copy stands for it), plus the entries the user supplied. This is the same hull the search steered by (its
running hull holds the lowest of each composition, which is the lowest unique minimum there), rebuilt from
the archive alone, so it can be written for a finished, killed or running run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition

from globopt.archive import Archive

# On the hull: within this (eV/atom) of it and the lowest structure of its composition.
ON_HULL = 1e-6


@dataclass
class HullPoint:
    """One structure on or above the hull, as hull.csv reports it."""

    composition: str  # reduced formula
    formula: str  # the cell content
    n_atoms: int
    enthalpy_per_atom: float
    formation_energy_per_atom: float
    e_above_hull: float
    spacegroup: str | None
    candidate_id: int | None  # None: a supplied entry
    origin: str
    stable: bool


class HullAnalysis:
    def __init__(self, archive: Archive, elements: list[str], given: list[PDEntry]) -> None:
        self.elements = list(elements)
        entries: list[PDEntry] = []
        records: dict[int, Any] = {}
        for record in archive.unique_minima():
            composition = Composition(record.formula)
            if {el.symbol for el in composition.elements} - set(self.elements):
                continue
            entries.append(
                PDEntry(composition, record.enthalpy_per_atom * record.n_atoms, attribute=record.id)
            )
            records[record.id] = record
        self.entries = entries + list(given)
        present = {e.composition.elements[0].symbol for e in self.entries if len(e.composition.elements) == 1}
        self.missing = [el for el in self.elements if el not in present]
        self.diagram = None if self.missing else PhaseDiagram(self.entries)
        self.points: list[HullPoint] = []
        if self.diagram is None:
            return
        stable = {id(e) for e in self.diagram.stable_entries}
        for entry in self.entries:
            record = records.get(entry.attribute) if isinstance(entry.attribute, int) else None
            above = float(self.diagram.get_e_above_hull(entry))
            self.points.append(
                HullPoint(
                    composition=entry.composition.reduced_formula,
                    formula=entry.composition.formula.replace(" ", ""),
                    n_atoms=int(entry.composition.num_atoms),
                    enthalpy_per_atom=float(entry.energy_per_atom),
                    formation_energy_per_atom=float(self.diagram.get_form_energy_per_atom(entry)),
                    e_above_hull=max(above, 0.0),
                    spacegroup=record.spacegroup if record is not None else None,
                    candidate_id=record.id if record is not None else None,
                    origin=record.origin if record is not None else f"given:{entry.name}",
                    stable=id(entry) in stable and above <= ON_HULL,
                )
            )
        self.points.sort(
            key=lambda p: (not p.stable, p.e_above_hull, self.position(p.composition), p.n_atoms)
        )

    def position(self, composition: str) -> tuple[float, ...]:
        """Where a composition sits along the system (first element's fraction first), for ordering."""
        amounts = Composition(composition)
        return tuple(-amounts.get_atomic_fraction(el) for el in self.elements)

    @property
    def stable(self) -> list[HullPoint]:
        """The stable phases along the system (first element's end first)."""
        return sorted((p for p in self.points if p.stable), key=lambda p: self.position(p.composition))

    def near(self, threshold: float) -> list[HullPoint]:
        """Relaxed structures of the run within ``threshold`` of the hull (stable ones included)."""
        return [p for p in self.points if p.e_above_hull <= threshold and p.candidate_id is not None]
