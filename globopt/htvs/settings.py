"""The ``htvs:`` section of a run config (validated by pydantic, like every other section).

Kept apart from ``globopt/config.py`` so the screening options live next to the code that uses them;
``config.py`` only plugs this section in. Paths are resolved against the config file's folder when the
config is loaded (see ``resolve_paths``), so a resumed run finds its templates from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from globopt.config_section import Section as _Section


def _check_mapping(value: dict[str, list[str]]) -> dict[str, list[str]]:
    from pymatgen.core.periodic_table import Element

    problems = []
    for site, targets in value.items():
        for symbol in [site, *targets]:
            if not Element.is_valid_symbol(symbol):
                problems.append(symbol)
    if problems:
        raise ValueError(f"unknown element symbol(s) {', '.join(sorted(set(problems)))}")
    return {site: list(dict.fromkeys(targets)) for site, targets in value.items()}


class TemplateSpec(_Section):
    """One source of template structures: exactly one of prototype, library, file, folder, ase_db."""

    prototype: str | None = Field(
        None,
        description="AFLOW prototype bundled with pymatgen: label (AB_cF8_225_a_b), Strukturbericht (B1) "
        "or mineral name (rock salt, zincblende, perovskite)",
    )
    library: Literal["aflow"] | None = Field(
        None,
        description="every prototype of pymatgen's AFLOW library with at most htvs.max_atoms atoms (and "
        "max_species elements): a corpus of structure types rather than a chosen few",
    )
    max_species: PositiveInt | None = Field(None, description="library templates: at most this many elements")
    file: str | None = Field(None, description="one CIF or POSCAR file")
    folder: str | None = Field(None, description="every *.cif / POSCAR* / *.vasp file in this folder")
    ase_db: str | None = Field(None, description="an ASE database file; every row (or those matching select)")
    select: str | None = Field(None, description="ASE database query string, e.g. 'natoms<10'")
    name: str | None = Field(None, description="label used in ranked.csv (default: derived from the source)")
    substitutions: dict[str, list[str]] | None = Field(
        None, description="element mapping for this template only (replaces htvs.substitutions)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> TemplateSpec:
        given = [k for k in ("prototype", "library", "file", "folder", "ase_db") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "a template needs exactly one of prototype, library, file, folder, ase_db "
                f"(got {given or 'none'})"
            )
        if self.select and not self.ase_db:
            raise ValueError("select applies only to ase_db templates")
        if self.max_species is not None and not self.library:
            raise ValueError("max_species applies only to library templates")
        return self

    @field_validator("substitutions")
    @classmethod
    def _valid_mapping(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        return None if value is None else _check_mapping(value)


class ProbabilityConfig(_Section):
    """Data-mined ionic substitutions (Hautier et al. 2011, pymatgen's lambda.json)."""

    threshold: float = Field(
        0.001, gt=0, lt=1, description="keep substitutions of the whole template more probable than this"
    )
    max_per_template: PositiveInt = Field(200, description="most probable substitutions kept per template")


class AlloyConfig(_Section):
    """Decorations of all-metal templates (intermetallics, elemental metals) with metals from a pool.

    The data-mined substitutions are a model of ions: a template without a charge-balanced
    oxidation-state guess gets none, so intermetallic structure types would be missing from a corpus.
    Each all-metal template instead gets up to ``max_per_template`` assignments of distinct pool elements
    to its species, drawn without replacement in an order fixed by the template's name and ``seed``.
    """

    elements: list[str] = Field(min_length=1, description="metals put on the sites of all-metal templates")
    max_per_template: PositiveInt = Field(50, description="decorations kept per all-metal template")
    seed: int = Field(0, description="which decorations are drawn when there are more than max_per_template")

    @field_validator("elements")
    @classmethod
    def _metals(cls, value: list[str]) -> list[str]:
        from pymatgen.core.periodic_table import Element

        value = list(_check_mapping({el: [] for el in value}))
        not_metals = [el for el in value if not Element(el).is_metal]
        if not_metals:
            names = ", ".join(not_metals)
            raise ValueError(f"not metals: {names} (alloy decorations put metals on metal sites)")
        return value


class PartialSpec(_Section):
    """Replace a fraction of one species' sites, giving symmetry-distinct ordered structures."""

    site: str = Field(description="template species whose sites are partly replaced, e.g. Na")
    by: str = Field(description="element put on the chosen sites, e.g. K")
    fraction: float = Field(gt=0, lt=1, description="fraction of that species' sites replaced")
    supercell: tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
        (1, 1, 1), description="supercell of the template cell before replacing"
    )
    max_structures: PositiveInt = Field(10, description="symmetry-distinct orderings kept per template")

    @field_validator("site", "by")
    @classmethod
    def _element(cls, value: str) -> str:
        _check_mapping({value: []})
        return value


class HtvsConfig(_Section):
    templates: list[TemplateSpec] = Field(default_factory=list, description="template structure sources")
    substitutions: dict[str, list[str]] = Field(
        default_factory=dict,
        description="template species -> replacement elements, e.g. {Na: [Li, K], Cl: [Br, I]}",
    )
    keep_original: bool = Field(True, description="each site may also keep its template species")
    probability: ProbabilityConfig | None = Field(
        None, description="add data-mined ionic substitutions above a probability threshold"
    )
    elements: list[str] | None = Field(
        None,
        description="the screen's elements: structures holding any other element (a template's own "
        "species included) are not enumerated (default: no restriction)",
    )
    alloys: AlloyConfig | None = Field(
        None,
        description="decorate all-metal templates with metals from a pool (no data-mined rule covers them)",
    )
    charge_neutral: bool = Field(
        False, description="skip substituted compositions with no charge-neutral oxidation-state guess"
    )
    partial: list[PartialSpec] = Field(default_factory=list, description="partial substitutions")
    competing_phases: list[str] = Field(
        default_factory=list,
        description="CIF/POSCAR files or folders (relaxed with the same potential) or a pymatgen entries "
        "JSON (energies must come from the same potential) added to the hull",
    )
    elemental_references: bool = Field(
        True, description="relax bundled elemental structures (ase dcdft set) as hull end points"
    )
    scale_volume: bool = Field(
        True, description="rescale each substituted cell from ionic/atomic radii before relaxing"
    )
    stable_threshold: float = Field(
        0.025, ge=0, description="eV/atom above the hull still written to stable/ (about kT at 300 K)"
    )
    max_atoms: PositiveInt = Field(60, description="largest cell screened (templates and supercells)")
    stop_after: PositiveInt | None = Field(
        None, description="screen only the first N enumerated structures (for trial runs)"
    )

    @field_validator("substitutions")
    @classmethod
    def _valid_mapping(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return _check_mapping(value)

    @field_validator("elements")
    @classmethod
    def _known_elements(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(_check_mapping({el: [] for el in value}))

    @model_validator(mode="after")
    def _has_templates(self) -> HtvsConfig:
        if not self.templates:
            raise ValueError("htvs.templates: give at least one template (prototype, file, folder or ase_db)")
        return self


def resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative template / competing-phase paths absolute against the config file's folder."""
    htvs = data.get("htvs")
    if not isinstance(htvs, dict):
        return data

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str((base / value).resolve())
        return value

    templates = htvs.get("templates")
    if isinstance(templates, list):
        for spec in templates:
            if isinstance(spec, dict):
                for key in ("file", "folder", "ase_db"):
                    if key in spec:
                        spec[key] = absolute(spec[key])
    phases = htvs.get("competing_phases")
    if isinstance(phases, list):
        htvs["competing_phases"] = [absolute(p) for p in phases]
    return data
