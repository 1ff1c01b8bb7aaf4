"""Elemental reference structures: the end points of every convex hull.

Formation energies are only meaningful against elements relaxed with the same potential, so the
screen relaxes each element's reference structure like any candidate (origin ``reference:<El>``). The
structures come from ASE's bundled ``dcdft`` set (71 elements, the Delta-test ground states, molecular
crystals for H, N, O, halogens) and ASE's ``bulk`` reference states for elements outside it.
"""

from __future__ import annotations

from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor


def elemental_reference(symbol: str) -> Structure | None:
    """A reasonable ground-state structure of the element, or None when none is bundled."""
    from ase.collections import dcdft

    if symbol in dcdft.names:
        structure = AseAtomsAdaptor.get_structure(dcdft[symbol])
    else:
        from ase.build import bulk

        try:
            structure = AseAtomsAdaptor.get_structure(bulk(symbol))
        except (ValueError, KeyError, NotImplementedError, RuntimeError):  # RuntimeError: tetragonal Pa
            return None
    # primitive cell: several dcdft cells are conventional (Ga, Cl2, ...) and cost twice the relaxation
    return structure.get_primitive_structure()
