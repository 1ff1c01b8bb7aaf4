"""The reference of a suite entry: its known structure and polymorphs, relaxed with the benchmark potential.

The reference is the *lowest* of them, not the entry's nominal structure. Why: a potential has its own energy
landscape, and if it puts a different known polymorph lower (M3GNet-MP-2021.2.8 puts anatase TiO2 below
rutile), a search that finds that polymorph has found the potential's ground state; counting only the nominal
structure would score a correct search as a failure, and a search that stops at the nominal one as a success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from globopt.evaluator.evaluate import spacegroup_of
from globopt.scoreboard.suite import Entry


class ReferenceError(RuntimeError):
    """A known structure did not relax to a usable minimum with the benchmark potential."""


@dataclass
class RelaxedReference:
    label: str  # 'given' or the polymorph's name
    energy_per_atom: float
    structure: Structure
    spacegroup: str | None


@dataclass
class Reference:
    """The lowest relaxed known structure of an entry, and every candidate considered."""

    entry: str
    best: RelaxedReference
    considered: list[RelaxedReference]

    def to_json(self) -> dict[str, Any]:
        return {
            "entry": self.entry,
            "source": self.best.label,
            "energy_per_atom": self.best.energy_per_atom,
            "spacegroup": self.best.spacegroup,
            "volume_per_atom": self.best.structure.volume / len(self.best.structure),
            "structure": self.best.structure.as_dict(),
            "considered": {r.label: {"energy_per_atom": r.energy_per_atom, "spacegroup": r.spacegroup}
                           for r in self.considered},
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        best = RelaxedReference(
            data["source"],
            data["energy_per_atom"],
            Structure.from_dict(data["structure"]),
            data["spacegroup"],
        )
        return cls(data["entry"], best, [best])


def relax_known(
    structure: Structure, label: str, potential: dict[str, Any], fmax: float, max_steps: int
) -> RelaxedReference:
    """Relax positions and cell tightly (fmax well below the search's) so the reference is a true minimum."""
    from globopt.evaluator.relax import RelaxSettings, relax
    from surrogates.potentials import build_calculator

    calculator = build_calculator(**potential)
    outcome = relax(
        AseAtomsAdaptor.get_atoms(structure), calculator, RelaxSettings(fmax=fmax, max_steps=max_steps)
    )
    if outcome.failure is not None:
        raise ReferenceError(f"{label}: relaxation failed ({outcome.failure}: {outcome.reason})")
    relaxed = AseAtomsAdaptor.get_structure(outcome.atoms)
    return RelaxedReference(label, outcome.energy / len(relaxed), relaxed, spacegroup_of(relaxed, 0.1)[0])


def reference_for(
    entry: Entry, potential: dict[str, Any], fmax: float = 0.01, max_steps: int = 1000
) -> Reference:
    considered = [relax_known(entry.structure, "given", potential, fmax, max_steps)]
    for name, structure in entry.polymorphs.items():
        considered.append(relax_known(structure, name, potential, fmax, max_steps))
    best = min(considered, key=lambda r: r.energy_per_atom)
    return Reference(entry.name, best, considered)
