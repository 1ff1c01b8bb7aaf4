"""Stopping a relaxation that is falling into a minimum the search has already found (opt-in).

In a GA many offspring of a good population are small changes (strain, a nudged atom, a soft-mode step) of a
member, and they relax straight back into it: a full relaxation that ends as a duplicate and teaches the
search nothing new. Before it converges such a relaxation is often recognisable: its enthalpy is just above
the known minimum's and its geometry already matches that minimum under the run's duplicate tolerances. The
watch stops it there (``stopped_early``, with the minimum's id and enthalpy) and saves the remaining steps.

The test: the same StructureMatcher tolerances as the duplicate check of relaxed structures, an enthalpy
between the minimum's and ``energy_window`` above it (a structure already below a known minimum is going
somewhere else), and a largest force below ``max_force`` (still steep means it may yet leave the basin).
That is not safe next to a metastable minimum. On 8-atom ZnO a relaxation sat on a known metastable
minimum's geometry down to 0.05 eV/Å and then slid into wurtzite, 53 meV/atom lower, and the two structures
match each other under the duplicate tolerances. Stopping it there lost the search its ground state. That
is why the watch is off by default; docs/surrogate.md has the measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor


@dataclass(frozen=True)
class KnownMinimum:
    """A relaxed minimum from the archive: its candidate id, enthalpy per atom and reduced cell."""

    candidate_id: int
    enthalpy_per_atom: float
    structure: Structure  # duplicates.reduced_for_matching of the relaxed structure


@dataclass(frozen=True)
class KnownMinimaSettings:
    ltol: float = 0.2  # StructureMatcher tolerances: the run's duplicates.* settings
    stol: float = 0.3
    angle_tol: float = 5.0
    energy_window: float = 0.03  # eV/atom above the known minimum
    max_force: float = 0.5  # eV/Å, largest force component
    first_step: int = 10  # optimiser steps before the first check
    every: int = 5  # steps between checks

    def __post_init__(self) -> None:
        if self.energy_window <= 0 or self.max_force <= 0 or self.first_step < 1 or self.every < 1:
            raise ValueError("the known-minimum watch needs energy_window, max_force, first_step, every > 0")


class KnownMinimaWatch:
    """Decides at a relaxation step whether it has entered the basin of a known minimum."""

    def __init__(self, settings: KnownMinimaSettings, minima: Sequence[KnownMinimum]) -> None:
        self.settings = settings
        self.minima = list(minima)
        self._matcher = StructureMatcher(
            ltol=settings.ltol,
            stol=settings.stol,
            angle_tol=settings.angle_tol,
            primitive_cell=True,
            scale=True,
        )
        self.entered: KnownMinimum | None = None

    def check(self, step: int, atoms: Atoms, enthalpy_per_atom: float) -> KnownMinimum | None:
        """The known minimum this relaxation is falling into, or None (also between checks)."""
        s = self.settings
        if not self.minima or step < s.first_step or (step - s.first_step) % s.every:
            return None
        candidates = [
            m for m in self.minima if 0.0 <= enthalpy_per_atom - m.enthalpy_per_atom <= s.energy_window
        ]
        if not candidates:
            return None
        if float(np.abs(atoms.get_forces()).max()) > s.max_force:
            return None
        snapshot = AseAtomsAdaptor.get_structure(atoms)
        for minimum in sorted(candidates, key=lambda m: m.enthalpy_per_atom):
            if self._matcher.fit(snapshot, minimum.structure):
                self.entered = minimum
                return minimum
        return None
