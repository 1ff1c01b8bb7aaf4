"""The config of a variable-composition search: ``chemical_system``, ``atoms`` and the ``hull:`` section.

Kept apart from ``globopt/config.py`` so the options live next to the code that uses them; ``config.py``
plugs the section in and calls :func:`check_variable_composition` for the rules that involve other keys.
Every problem is raised as a ``ValueError`` whose message starts with the key it concerns, so the config
layer reports it like any other mistake (exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from globopt.composition import MAX_ATOMS, parse_composition

# The GA's operator probabilities when a chemical system is searched and ga.operators is not given:
# heredity (across compositions) stays the main operator, as in USPEX; a fifth of the children change
# composition by single atoms (transmutation, addition, removal), so the search walks between neighbouring
# compositions without depending on heredity alone.
VARIABLE_COMPOSITION_OPERATORS = {
    "heredity": 0.3,
    "transmutation": 0.1,
    "add_atom": 0.05,
    "remove_atom": 0.05,
    "lattice_strain": 0.1,
    "permutation": 0.1,
    "coordinate": 0.05,
    "soft": 0.1,
    "symmetric": 0.05,
    "immigrant": 0.1,
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class HullConfig(_Section):
    """What a variable-composition search may build and how its hull is reported."""

    element_counts: dict[str, tuple[int, int]] = Field(
        default_factory=dict,
        description="per-element bounds [min, max] on the atoms of that element in a cell",
    )
    compositions: list[str | dict[str, int]] | None = Field(
        None,
        description="only these compositions (any multiple within `atoms`), e.g. [Al, AlNi, AlNi3, Ni]",
    )
    elemental_references: bool = Field(
        True, description="relax the bundled elemental ground-state structures first, as hull end points"
    )
    competing_phases: list[str] = Field(
        default_factory=list,
        description="extra phases on the hull: CIF/POSCAR files or folders (relaxed in the run), or a "
        "pymatgen entries JSON (used as given; energies from the same potential)",
    )
    stable_threshold: float = Field(
        0.025, ge=0, description="eV/atom above the hull up to which a structure is written to stable/"
    )
    spread_temperature: float = Field(
        0.1,
        gt=0,
        description="eV/atom: how strongly random structures favour compositions near the hull "
        "(weight exp(-distance / T) / (1 + proposals there))",
    )
    max_per_composition: PositiveInt = Field(
        2, description="GA population members of one composition at most"
    )

    @field_validator("element_counts", mode="before")
    @classmethod
    def _parse_bounds(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        parsed = {}
        for element, bounds in value.items():
            if isinstance(bounds, int) and not isinstance(bounds, bool):
                bounds = (bounds, bounds)
            elif isinstance(bounds, str) and "-" in bounds:
                low, _, high = bounds.partition("-")
                bounds = (low.strip(), high.strip())
            parsed[element] = bounds
        return parsed

    @field_validator("element_counts")
    @classmethod
    def _ordered_bounds(cls, value: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        for element, (low, high) in value.items():
            if not 0 <= low <= high:
                raise ValueError(f"{element}: expected [min, max] with 0 <= min <= max, got [{low}, {high}]")
        return value


def parse_atoms(value: Any) -> Any:
    """``atoms: 8``, ``[2, 8]`` or ``"2-8"`` -> (low, high)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, str) and "-" in value:
        low, _, high = value.partition("-")
        return (low.strip(), high.strip())
    return value


def check_atoms(value: tuple[int, int] | None) -> tuple[int, int] | None:
    if value is not None and not 1 <= value[0] <= value[1] <= MAX_ATOMS:
        raise ValueError(f"expected n or [low, high] with 1 <= low <= high <= {MAX_ATOMS}")
    return value


def parse_chemical_system(value: Any) -> Any:
    """``[Al, Ni]`` or ``"Al-Ni"`` -> a list of distinct element symbols, in the order given."""
    from pymatgen.core import Element

    if isinstance(value, str):
        value = [part.strip() for part in value.replace(",", "-").split("-") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of element symbols, e.g. [Al, Ni], or a string 'Al-Ni'")
    symbols = [str(v) for v in value]
    bad = [s for s in symbols if not Element.is_valid_symbol(s)]
    if bad:
        raise ValueError(f"{', '.join(repr(b) for b in bad)}: not a chemical element symbol")
    repeated = sorted({s for s in symbols if symbols.count(s) > 1})
    if repeated:
        raise ValueError(f"element(s) {', '.join(repeated)} given more than once")
    if len(symbols) < 2:
        raise ValueError(
            "a chemical system needs at least two elements; for one element use composition and formula_units"
        )
    return symbols


def check_variable_composition(config: Any) -> None:
    """Rules of a chemical-system search that involve other keys; ValueError naming the key otherwise."""
    system = config.chemical_system
    if system is None:
        if config.atoms is not None:
            raise ValueError("atoms: only used with chemical_system (a search over a whole chemical system)")
        if config.hull is not None:
            raise ValueError("hull: only used with chemical_system (a search over a whole chemical system)")
        _composition_operators_need_a_system(config)
        return
    if config.composition is not None or config.formula_units is not None:
        raise ValueError(
            "chemical_system: searches every composition of the system; remove composition and "
            "formula_units (or remove chemical_system to search one composition)"
        )
    if config.mode not in ("ga", "random"):
        raise ValueError(
            f"chemical_system: mode {config.mode} cannot search a chemical system; use mode ga or random "
            f"(the particle swarm compares structures of one cell content, a screen enumerates templates)"
        )
    if config.atoms is None:
        raise ValueError("atoms: required with chemical_system: the atoms per cell, n or [low, high]")
    if config.objectives:
        raise ValueError(
            "objectives: not supported with chemical_system (the fitness is the energy above the hull)"
        )
    if config.budget.target_enthalpy_per_atom is not None:
        raise ValueError(
            "budget.target_enthalpy_per_atom: compares enthalpies per atom, which across the compositions "
            "of a chemical system says nothing about stability; remove it"
        )
    # independent problems are reported together, each starting with its key
    problems = []
    from surrogates.potentials import covered_elements

    covered = covered_elements(config.potential.kind, config.potential.model)
    if covered is not None:
        missing = [el for el in system if el not in covered]
        if missing:
            problems.append(
                f"chemical_system: element(s) {', '.join(missing)} not covered by the potential "
                f"(potential.kind={config.potential.kind}, model={config.potential.model}); "
                f"it covers: {' '.join(sorted(covered))}"
            )
    from globopt.hull.space import SpaceError

    try:
        space = space_from_config(config)
    except SpaceError as exc:
        problems.append(str(exc))
        space = None
    settings = config.hull
    if space is not None and not settings.elemental_references:
        missing = [el for el in system if not space.allows_element(el)]
        if missing and not settings.competing_phases:
            problems.append(
                f"hull.elemental_references: false leaves no end point for {', '.join(missing)} (the bounds "
                f"exclude cells of the pure element and no competing phase is given); keep it true"
            )
    from globopt.hull.starts import StartError, fixed_starts

    try:
        fixed_starts(config)
    except StartError as exc:
        problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))


def _composition_operators_need_a_system(config: Any) -> None:
    from globopt.search.composition_operators import COMPOSITION_OPERATORS

    used = sorted(name for name, p in config.ga.operators.items() if name in COMPOSITION_OPERATORS and p > 0)
    if used:
        raise ValueError(
            f"ga.operators: {', '.join(used)} change the composition and need chemical_system; remove them"
        )


def resolve_hull_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative hull.competing_phases paths absolute against the config file's folder."""
    hull = data.get("hull")
    if isinstance(hull, dict) and isinstance(hull.get("competing_phases"), list):
        hull["competing_phases"] = [
            str((base / p).resolve()) if isinstance(p, str) and p and not Path(p).is_absolute() else p
            for p in hull["competing_phases"]
        ]
    return data


def space_from_config(config: Any):
    """The composition space of a validated config (SpaceError naming the key when it is empty)."""
    from globopt.hull.space import CompositionSpace, SpaceError

    try:
        compositions = allowed_compositions(config.hull)
    except ValueError as exc:
        raise SpaceError(str(exc)) from None
    checks = config.checks
    return CompositionSpace(
        config.chemical_system, config.atoms, config.hull.element_counts, compositions,
        checks.min_distance_factor, checks.volume_factor_range,
    )  # fmt: skip


def allowed_compositions(settings: HullConfig) -> list[dict[str, int]] | None:
    """The ``hull.compositions`` entries parsed (ValueError naming the entry otherwise)."""
    if settings.compositions is None:
        return None
    if not settings.compositions:
        raise ValueError("hull.compositions: empty list; remove the key to allow every composition")
    parsed = []
    for entry in settings.compositions:
        try:
            parsed.append(parse_composition(entry))
        except ValueError as exc:
            raise ValueError(f"hull.compositions: {entry!r}: {exc}") from None
    return parsed
