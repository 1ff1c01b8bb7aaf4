"""A benchmark suite: known crystal structures written as space group + lattice + Wyckoff positions (or CIF).

Why symmetry data rather than copied CIFs: a prototype is fully described by its space group, a few lattice
parameters and the Wyckoff coordinates, which are textbook facts; pymatgen expands them into the cell. The
lattice constants only need to be close, because every structure is relaxed with the benchmark potential
before it becomes the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.groups import SpaceGroup

from globopt.composition import MAX_ATOMS
from globopt.config import ConfigError, PotentialConfig, read_yaml_mapping

SEARCH_MODES = ("random", "ga", "pso", "ase-ga")
# Å: symmetry copies of one site closer than this are one atom (see _merge_boundary_copies)
COINCIDENT_SITES = 0.01


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StructureSpec(_Strict):
    """One known structure: ``cif`` (path relative to the suite file) or space group + lattice + sites."""

    cif: str | None = None
    spacegroup: str | int | None = Field(None, description="Hermann-Mauguin symbol (Fm-3m) or number")
    lattice: dict[str, float] | None = Field(None, description="a [, b, c, alpha, beta, gamma]; Å, degrees")
    species: list[str] | None = None
    coords: list[tuple[float, float, float]] | None = Field(None, description="one Wyckoff site per species")
    cell: Literal["primitive", "conventional"] = Field(
        "primitive", description="cell searched and matched: the primitive cell (default) or the conventional"
    )
    supercell: PositiveInt | tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
        1,
        description="multiply the cell: n (n x 1 x 1) or [na, nb, nc]; the search looks for that many "
        "copies of its content (a hit is still matched against the primitive reference)",
    )

    @model_validator(mode="after")
    def _complete(self) -> StructureSpec:
        if self.cif is not None:
            if any(v is not None for v in (self.spacegroup, self.lattice, self.species, self.coords)):
                raise ValueError("give either cif or spacegroup/lattice/species/coords, not both")
            return self
        missing = [k for k in ("spacegroup", "lattice", "species", "coords") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)} (or give cif: PATH)")
        if len(self.species) != len(self.coords):
            raise ValueError(f"{len(self.species)} species but {len(self.coords)} coords; give one per site")
        unknown = sorted(set(self.lattice) - {"a", "b", "c", "alpha", "beta", "gamma"})
        if unknown or "a" not in self.lattice:
            raise ValueError(f"lattice needs a (and optionally b, c, alpha, beta, gamma); got {self.lattice}")
        return self


class PolymorphSpec(StructureSpec):
    name: str = Field(description="label, e.g. 'anatase'")


class EntrySpec(StructureSpec):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="label used in run directories")
    prototype: str = Field("", description="structure type, e.g. 'rock salt'")
    polymorphs: list[PolymorphSpec] = Field(
        default_factory=list,
        description="other known polymorphs of the same composition; the lowest relaxed one is the reference",
    )


class SuiteSpec(_Strict):
    name: str
    description: str = ""
    budget: PositiveInt = Field(40, description="evaluations (relaxations) per search")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    modes: list[str] = Field(default_factory=lambda: ["random", "ga", "pso"])
    potential: dict[str, Any] = Field(default_factory=lambda: {"kind": "matgl"})
    search: dict[str, Any] = Field(
        default_factory=dict,
        description="extra run-config keys for every search (ga:, pso:, relax:, checks:, ...)",
    )
    reference_fmax: PositiveFloat = Field(0.01, description="eV/Å for relaxing the known structures")
    reference_max_steps: PositiveInt = 1000
    hit_tolerance: PositiveFloat = Field(0.001, description="eV/atom above the reference that still counts")
    structures: list[EntrySpec]

    @field_validator("potential")
    @classmethod
    def _valid_potential(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Same keys and defaults as a run config's potential section, so searches and references agree."""
        return PotentialConfig.model_validate(value).model_dump()

    @model_validator(mode="after")
    def _check(self) -> SuiteSpec:
        bad = [m for m in self.modes if m not in SEARCH_MODES]
        if bad:
            raise ValueError(f"modes: unknown {bad}; allowed: {', '.join(SEARCH_MODES)}")
        names = [e.name for e in self.structures]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"structures: names must be unique, repeated: {', '.join(repeated)}")
        if not self.structures:
            raise ValueError("structures: the suite lists no structure")
        return self


@dataclass
class Entry:
    """A suite entry with its structures built (unrelaxed)."""

    name: str
    prototype: str
    structure: Structure
    polymorphs: dict[str, Structure] = field(default_factory=dict)

    @property
    def composition(self) -> dict[str, int]:
        """Cell content the search looks for: the entry's cell (primitive unless asked otherwise)."""
        return {el.symbol: int(n) for el, n in self.structure.composition.items()}


@dataclass
class Suite:
    spec: SuiteSpec
    entries: list[Entry]
    source: Path

    def select(self, names: list[str] | None) -> list[Entry]:
        if not names:
            return self.entries
        known = {e.name: e for e in self.entries}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"{self.source}: no structure named {', '.join(unknown)}; the suite has {', '.join(known)}"
            )
        return [known[n] for n in names]


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file and build its structures; ConfigError names every problem."""
    path = Path(path)
    data = read_yaml_mapping(path, "benchmark suite", "name, structures")
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as exc:
        problems = [f"'{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in exc.errors()]
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{path}: {len(problems)} problem(s):\n{listing}") from None
    entries = []
    for entry in spec.structures:
        where = f"{path}: structure {entry.name}"
        structure = build_structure(entry, path.parent, where)
        polymorphs = {}
        for poly in entry.polymorphs:
            built = build_structure(poly, path.parent, f"{where}, polymorph {poly.name}")
            if built.composition.reduced_composition != structure.composition.reduced_composition:
                raise ConfigError(
                    f"{where}, polymorph {poly.name}: composition {built.composition.reduced_formula} "
                    f"differs from {structure.composition.reduced_formula}"
                )
            _check_fits(built, structure, f"{where}, polymorph {poly.name}")
            polymorphs[poly.name] = built
        entries.append(Entry(entry.name, entry.prototype, structure, polymorphs))
    return Suite(spec, entries, path)


def _check_fits(polymorph: Structure, searched: Structure, where: str) -> None:
    """A polymorph must fit the searched cell: its primitive cell's formula units divide the cell's.

    Why: a polymorph that is lower than the given structure becomes the reference. If the searched cell
    cannot hold it (cristobalite SiO2, 4 formula units, in a 6-unit quartz cell), no search can find it and
    the entry only scores hits by the energy rule, against a reference the cell cannot reach.
    """
    units = searched.composition.get_reduced_composition_and_factor()[1]
    primitive = polymorph.get_primitive_structure()
    needed = primitive.composition.get_reduced_composition_and_factor()[1]
    if round(units) % round(needed):
        raise ConfigError(
            f"{where}: its primitive cell has {needed:g} formula units, which do not divide the "
            f"{units:g} of the searched cell, so a search could not find it; enlarge the entry's cell "
            "(supercell:) or leave the polymorph out"
        )


def build_structure(spec: StructureSpec, folder: Path, where: str) -> Structure:
    """The cell described by ``spec`` (primitive unless ``cell: conventional``), with a size check."""
    try:
        if spec.cif is not None:
            cif = folder / spec.cif
            if not cif.is_file():
                raise ConfigError(f"{where}: CIF file {cif} does not exist")
            structure = Structure.from_file(cif)
        else:
            lattice = _lattice(spec.spacegroup, spec.lattice)
            structure = Structure.from_spacegroup(spec.spacegroup, lattice, spec.species, spec.coords)
            structure = _merge_boundary_copies(structure, where)
    except ConfigError:
        raise
    except Exception as exc:  # pymatgen raises ValueError/KeyError/... for bad symmetry data
        raise ConfigError(f"{where}: cannot build the structure: {exc}") from exc
    if spec.cell == "primitive":
        structure = structure.get_primitive_structure()
    if spec.supercell != 1:
        scaling = (spec.supercell, 1, 1) if isinstance(spec.supercell, int) else spec.supercell
        structure = structure.make_supercell(list(scaling), in_place=False)
    if not 1 <= len(structure) <= MAX_ATOMS:
        raise ConfigError(f"{where}: {len(structure)} atoms in the cell; 1..{MAX_ATOMS} allowed")
    return structure


def _merge_boundary_copies(structure: Structure, where: str) -> Structure:
    """One atom per special position, also when its typed coordinates are rounded.

    Why: Wyckoff coordinates are typed to a few decimals (2/3 as 0.6666667). The symmetry copies of such a
    special position then land 1e-7 apart on either side of a cell face (z = 0.9999999 and 0.0000001),
    and pymatgen's duplicate check, which does not wrap coordinates, keeps both: alpha-quartz with Si at
    (x, 0, 0.6666667) came out with 10 atoms instead of 9. Copies of one site are merged; two different
    species on one spot mean wrong input and are reported.
    """
    if len(structure) < 2:
        return structure
    distances = structure.distance_matrix + np.eye(len(structure)) * 1e9
    close = np.argwhere(np.triu(distances < COINCIDENT_SITES))
    if not len(close):
        return structure
    for i, j in close:
        if structure[i].species != structure[j].species:
            raise ConfigError(
                f"{where}: {structure[i].species_string} and {structure[j].species_string} sit on the same "
                f"spot {structure[i].frac_coords.round(4).tolist()}; check the Wyckoff coordinates"
            )
    return structure.copy().merge_sites(tol=COINCIDENT_SITES, mode="delete")


def _lattice(spacegroup: str | int, params: dict[str, float]) -> Lattice:
    """Fill the parameters the crystal system fixes (b=a for tetragonal, gamma=120 for hexagonal, ...)."""
    system = (
        SpaceGroup.from_int_number(spacegroup).crystal_system
        if isinstance(spacegroup, int)
        else (SpaceGroup(spacegroup).crystal_system)
    )
    a = params["a"]
    defaults = {"b": a, "c": a, "alpha": 90.0, "beta": 90.0, "gamma": 90.0}
    if system in ("hexagonal", "trigonal"):
        defaults["gamma"] = 120.0
    values = {**defaults, **params}
    return Lattice.from_parameters(
        values["a"], values["b"], values["c"], values["alpha"], values["beta"], values["gamma"]
    )
