"""Template structures: AFLOW prototypes bundled with pymatgen, CIF/POSCAR files and folders, ASE databases.

Templates must be ordered (one species per site): a screen relaxes concrete structures. A CIF with partial
occupancies is an error naming the sites, because silently picking an ordering would screen a structure
the user never asked for; ``htvs.partial`` is the way to ask for orderings of a mixed site.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from pymatgen.core import Structure

from globopt.htvs.settings import TemplateSpec

STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar")


class TemplateError(ValueError):
    """A template source cannot be used; the message names it and what is expected."""


@dataclass(frozen=True)
class Template:
    name: str
    structure: Structure
    substitutions: dict[str, list[str]] | None = None  # per-template mapping (None: the global one)

    @property
    def species(self) -> list[str]:
        """Template species in a fixed order (sorted by electronegativity, as pymatgen formulas are)."""
        return [el.symbol for el in sorted(self.structure.composition.elements)]


def load_templates(specs: list[TemplateSpec], max_atoms: int) -> list[Template]:
    """Every template of every source, in config order; names are made unique."""
    templates: list[Template] = []
    for spec in specs:
        if spec.library:
            prefix = f"{spec.name}:" if spec.name else ""
            for label, structure in library_prototypes(max_atoms, spec.max_species or 1000):
                templates.append(Template(prefix + label, structure, spec.substitutions))
            continue
        for name, structure in _load_source(spec):
            _check_ordered(name, structure)
            if len(structure) > max_atoms:
                raise TemplateError(
                    f"template {name}: {len(structure)} atoms, more than htvs.max_atoms={max_atoms}"
                )
            templates.append(Template(name, structure, spec.substitutions))
    seen: dict[str, int] = {}
    unique = []
    for template in templates:
        count = seen.get(template.name, 0)
        seen[template.name] = count + 1
        name = template.name if count == 0 else f"{template.name}#{count + 1}"
        unique.append(Template(name, template.structure, template.substitutions))
    return unique


def _load_source(spec: TemplateSpec) -> list[tuple[str, Structure]]:
    if spec.prototype:
        label, structure = prototype(spec.prototype)
        return [(spec.name or label, structure)]
    if spec.file:
        path = Path(spec.file)
        if not path.is_file():
            raise TemplateError(f"template file {path} does not exist")
        return [(spec.name or path.stem, read_structure(path))]
    if spec.folder:
        folder = Path(spec.folder)
        if not folder.is_dir():
            raise TemplateError(f"template folder {folder} does not exist")
        files = sorted(p for p in folder.iterdir() if _is_structure_file(p))
        if not files:
            raise TemplateError(f"template folder {folder} holds no *.cif, *.vasp or POSCAR* file")
        prefix = f"{spec.name}:" if spec.name else ""
        return [(prefix + p.stem, read_structure(p)) for p in files]
    return _from_ase_db(Path(spec.ase_db), spec.select, spec.name)


def _is_structure_file(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() in STRUCTURE_SUFFIXES or path.name.startswith("POSCAR"))


def read_structure(path: Path) -> Structure:
    """One structure from a CIF or POSCAR; partial occupancies are kept so the caller can report them."""
    try:
        if path.suffix.lower() == ".cif":
            from pymatgen.io.cif import CifParser

            structures = CifParser(path, occupancy_tolerance=1.0).parse_structures(primitive=False)
            if not structures:
                raise ValueError("no structure in the file")
            return structures[0]
        return Structure.from_file(path)
    except TemplateError:
        raise
    except Exception as exc:  # pymatgen raises many types for malformed files
        raise TemplateError(f"cannot read template {path}: {type(exc).__name__}: {exc}") from exc


def _from_ase_db(path: Path, select: str | None, name: str | None) -> list[tuple[str, Structure]]:
    if not path.is_file():
        raise TemplateError(f"template ASE database {path} does not exist")
    from ase.db import connect
    from pymatgen.io.ase import AseAtomsAdaptor

    try:
        rows = list(connect(str(path)).select(select or ""))
    except Exception as exc:
        raise TemplateError(f"cannot read ASE database {path} (select={select!r}): {exc}") from exc
    if not rows:
        raise TemplateError(f"ASE database {path} has no row matching select={select!r}")
    prefix = name or path.stem
    return [(f"{prefix}:{row.id}", AseAtomsAdaptor.get_structure(row.toatoms())) for row in rows]


def _check_ordered(name: str, structure: Structure) -> None:
    if structure.is_ordered:
        return
    mixed = [f"site {i} ({site.species.formula})" for i, site in enumerate(structure) if not site.is_ordered]
    shown = ", ".join(mixed[:5]) + (f" and {len(mixed) - 5} more" if len(mixed) > 5 else "")
    raise TemplateError(
        f"template {name} has partial occupancies at {shown}; HTVS screens ordered structures: give an "
        f"ordered template and use htvs.partial to enumerate orderings of a mixed site"
    )


# -- AFLOW prototypes ------------------------------------------------------------------------------------
def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _library_path() -> Path:
    """pymatgen's bundled AFLOW library file, found without importing pymatgen.analysis.prototypes: that
    import decodes all 288 prototypes (tens of seconds on a busy machine) where a screen needs a few."""
    import importlib.util

    package = importlib.util.find_spec("pymatgen.analysis")  # a namespace package: no __file__
    folder = Path(next(iter(package.submodule_search_locations)))
    return folder / "prototypes" / "aflow_prototypes.json.gz"


@functools.lru_cache(maxsize=1)
def _prototype_library() -> list[dict]:
    """The library as plain JSON (StructureNL dicts are decoded only for the prototypes asked for)."""
    import gzip
    import json

    with gzip.open(_library_path(), "rt") as handle:
        return json.load(handle)


@functools.lru_cache(maxsize=1)
def _prototype_index() -> dict[str, list[int]]:
    """Normalised AFLOW label, Strukturbericht designation and mineral names -> library positions."""
    index: dict[str, list[int]] = {}
    for position, entry in enumerate(_prototype_library()):
        tags = entry["tags"]
        names = [tags.get("aflow", ""), tags.get("strukturbericht", "")]
        mineral = tags.get("mineral", "") or ""
        for part in mineral.split(","):
            names.append(part)
            names.append(re.sub(r"\(.*?\)", "", part))  # "(Cubic) Perovskite" is also "perovskite"
        for alias in {_normalise(n) for n in names if n and n.strip()}:
            index.setdefault(alias, []).append(position)
    return index


def library_prototypes(max_atoms: int, max_species: int) -> list[tuple[str, Structure]]:
    """(AFLOW label, structure) of every library prototype within the size limits, in library order.

    Prototypes above the limits are left out rather than refused: a library template asks for the
    structure types that fit, where a named prototype that does not fit is a mistake worth an error.
    """
    chosen = []
    for entry in _prototype_library():
        structure = Structure.from_dict(entry["snl"])
        if len(structure) > max_atoms or len(structure.composition.elements) > max_species:
            continue
        structure.remove_oxidation_states()
        chosen.append((entry["tags"]["aflow"], structure))
    return chosen


def prototype(name: str) -> tuple[str, Structure]:
    """(AFLOW label, structure) of a prototype by label, Strukturbericht designation or mineral name."""
    library = _prototype_library()
    index = _prototype_index()
    hits = index.get(_normalise(name), [])
    if not hits:
        import difflib

        close = difflib.get_close_matches(_normalise(name), list(index), n=3)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise TemplateError(
            f"unknown prototype {name!r}: give an AFLOW label (e.g. AB_cF8_225_a_b), a Strukturbericht "
            f"designation (e.g. B1) or a mineral name from pymatgen's AFLOW library{hint}"
        )
    if len(hits) > 1:
        labels = [library[i]["tags"]["aflow"] for i in hits]
        raise TemplateError(
            f"prototype name {name!r} is ambiguous ({len(hits)} prototypes: {', '.join(labels[:8])}); "
            f"give the AFLOW label"
        )
    entry = library[hits[0]]
    structure = Structure.from_dict(entry["snl"])  # the SNL dict holds lattice and sites at its top level
    structure.remove_oxidation_states()
    return entry["tags"]["aflow"], structure
