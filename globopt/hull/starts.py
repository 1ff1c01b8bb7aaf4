"""What a variable-composition run relaxes before its search proper, and the phases it takes as given.

Formation energies mean something only against end members relaxed with the same potential, so the run
relaxes the bundled elemental ground states first (``reference:<El>``, ASE's dcdft set, as a screen does),
then the user's competing-phase structure files (``competing:<name>``). Both go through the same pipeline
as every candidate and land on the hull like any result; the search may still find lower elemental
structures, which then replace them as end points. A pymatgen entries JSON among the competing phases is
not relaxed: its entries stand on the hull as given and must come from the same potential.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pymatgen.analysis.phase_diagram import PDEntry
from pymatgen.core import Structure


class StartError(ValueError):
    """A competing phase or a reference that cannot be used; the message names the key."""


def fixed_starts(config: Any) -> list[tuple[str, Structure]]:
    """(origin, structure) of the elemental references and competing-phase structures, in proposal order."""
    from globopt.htvs.enumeration import _competing_structures
    from globopt.htvs.references import elemental_reference
    from globopt.htvs.templates import TemplateError

    system = list(config.chemical_system)
    starts: list[tuple[str, Structure]] = []
    if config.hull.elemental_references:
        missing = []
        for element in system:
            structure = elemental_reference(element)
            if structure is None:
                missing.append(element)
            else:
                starts.append((f"reference:{element}", structure))
        if missing:
            raise StartError(
                f"hull.elemental_references: no bundled structure for {', '.join(missing)}; give one as a "
                f"CIF in hull.competing_phases and set hull.elemental_references: false"
            )
    try:
        competing, _ = _competing_structures(config.hull.competing_phases)
    except TemplateError as exc:
        raise StartError(f"hull.competing_phases: {exc}") from None
    for name, structure in competing:
        outside = sorted({el.symbol for el in structure.composition.elements} - set(system))
        if outside:
            raise StartError(
                f"hull.competing_phases: {name} holds {', '.join(outside)}, outside chemical_system {system}"
            )
        starts.append((f"competing:{name}", structure))
    return starts


def given_entries(config: Any) -> list[PDEntry]:
    """Entries of the competing-phase JSON files within the chemical system (others cannot be on its hull)."""
    from globopt.htvs.hull import load_entries

    system = set(config.chemical_system)
    entries = []
    for text in config.hull.competing_phases:
        path = Path(text)
        if path.suffix.lower() != ".json":
            continue
        try:
            loaded = load_entries(path)
        except (OSError, ValueError) as exc:
            raise StartError(f"hull.competing_phases: {exc}") from None
        inside = [e for e in loaded if {el.symbol for el in e.composition.elements} <= system]
        if not inside:
            raise StartError(
                f"hull.competing_phases: {path} holds no entry of the chemical system {sorted(system)}"
            )
        entries.extend(inside)
    return entries


def entries_fingerprint(entries: list[PDEntry]) -> str:
    """Changes when the given entries change, so a resume cannot continue on a different hull."""
    text = json.dumps(sorted((e.composition.formula, round(e.energy, 8)) for e in entries))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
