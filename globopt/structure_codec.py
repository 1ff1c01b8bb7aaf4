"""How structures are written into the archive, the search state and messages between processes.

One compact form everywhere: lattice rows, species and fractional coordinates as JSON numbers (which
round-trip exactly), nothing else. Site properties are left out on purpose: relaxed structures carry
ASE-derived ones that JSON cannot hold, and no part of the engine reads them, so a structure read back
is the same crystal the running engine held, number for number. Structures written as pymatgen's full
``as_dict`` (older archives and checkpoints) are still read.
"""

from __future__ import annotations

import json
from typing import Any

from pymatgen.core import Lattice, Structure


def structure_to_dict(structure: Structure) -> dict[str, Any]:
    if not structure.is_ordered:  # partial occupancies need pymatgen's own form
        return structure.as_dict()
    return {
        "lattice": structure.lattice.matrix.tolist(),
        "species": [str(site.specie) for site in structure],
        "frac": structure.frac_coords.tolist(),
    }


def structure_from_dict(data: dict[str, Any]) -> Structure:
    if "sites" in data:  # pymatgen's as_dict
        return Structure.from_dict(data)
    return Structure(Lattice(data["lattice"]), data["species"], data["frac"])


def structure_to_json(structure: Structure) -> str:
    return json.dumps(structure_to_dict(structure), separators=(",", ":"))


def structure_from_json(text: str) -> Structure:
    return structure_from_dict(json.loads(text))


def without_site_properties(structure: Structure) -> Structure:
    """The crystal as it reads back from the archive, so memory and a resumed run hold the same object."""
    return structure_from_dict(structure_to_dict(structure))
