"""The run configuration: a YAML file validated by pydantic.

Every mistake a user can make in the file is reported with the dotted key it concerns and what is
allowed there, before any expensive work starts (``globopt validate`` runs exactly this).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from globopt.composition import MAX_ATOMS, cell_contents, formula_string, is_reduced, parse_composition
from globopt.config_section import Section
from globopt.htvs.settings import HtvsConfig, resolve_paths
from globopt.hull.settings import (
    VARIABLE_COMPOSITION_OPERATORS,
    HullConfig,
    check_atoms,
    check_variable_composition,
    parse_atoms,
    parse_chemical_system,
    resolve_hull_paths,
)
from globopt.search.composition_operators import COMPOSITION_OPERATORS
from globopt.search.operators import OPERATORS
from surrogates.m3gnet import DEFAULT_MODEL


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message lists every problem found."""


_Section = Section

# Validation context key: False skips the checks that look outside the config (model folders, template and
# checkpoint files, calculator imports), for reading a finished run's stored config on another machine.
CHECK_ENVIRONMENT = "check_environment"


def _checks_environment(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get(CHECK_ENVIRONMENT, True))


# budget.evaluations of an htvs run without one: the enumeration ends the run, not the budget.
HTVS_UNLIMITED_BUDGET = 10**9


class BudgetConfig(_Section):
    evaluations: PositiveInt = Field(40, description="relaxations to run (counted across restarts)")
    target_enthalpy_per_atom: float | None = Field(
        None,
        description="stop once a relaxed structure reaches this enthalpy per atom (eV/atom; e.g. a known "
        "phase's energy under the same potential): in-flight relaxations finish, nothing new is started",
    )
    force_calls: PositiveInt | None = Field(
        None,
        description="stop once the relaxations have used this many potential (force) calls in total, counted "
        "across restarts: a budget in compute rather than in relaxations, the fair one when some relaxations "
        "are stopped early; in-flight relaxations finish, nothing new is started",
    )


class PotentialConfig(_Section):
    kind: Literal["matgl", "emt", "chgnet", "ase"] = Field(
        "matgl",
        description="matgl (M3GNet etc.), emt (ASE EMT, for tests), chgnet, or ase (any ASE calculator)",
    )
    model: str | None = Field(
        None, description=f"matgl model name or folder (kind: matgl only; default {DEFAULT_MODEL})"
    )
    calculator: str | None = Field(
        None, description="'package.module:ClassName' of an ASE calculator (kind: ase)"
    )
    calculator_kwargs: dict[str, Any] = Field(default_factory=dict)
    device: str = Field(
        "cpu",
        description="where the potential runs: cpu, cuda or cuda:N (checked when the config is read: "
        "the device must exist there)",
    )

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str) -> str:
        from surrogates.potentials import device_problem

        problem = device_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _settings_fit_the_kind(self) -> PotentialConfig:
        if self.kind == "ase" and not self.calculator:
            raise ValueError(
                "potential.calculator is required with kind: ase (e.g. 'ase.calculators.emt:EMT')"
            )
        if self.kind != "ase" and self.calculator:
            raise ValueError(
                f"potential.calculator is used only with kind: ase (got kind: {self.kind}); remove it"
            )
        if self.kind == "matgl":
            if self.model is None:
                self.model = DEFAULT_MODEL
        elif self.model == DEFAULT_MODEL:
            self.model = None  # configs written by earlier versions store the default model for every kind
        elif self.model is not None:
            raise ValueError(
                f"potential.model is used only with kind: matgl (got kind: {self.kind}, "
                f"model: {self.model!r}); remove it"
            )
        return self

    @property
    def label(self) -> str:
        """What the logs and `globopt status` call this potential: emt, matgl:<model>, ase:<class>."""
        if self.kind == "matgl":
            return f"matgl:{self.model}"
        if self.kind == "ase":
            return f"ase:{self.calculator}"
        return self.kind

    def check_available(self) -> frozenset[str] | None:
        """Resolve the potential now, the way a run will: raise ValueError naming what is missing.

        Returns the elements it covers when that is known without loading it. A model that cannot be
        found or whose files are damaged would otherwise only show up in the first relaxation, after the
        run directory exists.
        """
        from surrogates.potentials import PotentialUnavailableError, check_potential

        try:
            return check_potential(self.kind, self.model, self.calculator)
        except PotentialUnavailableError as exc:
            raise ValueError(str(exc)) from None


class RelaxConfig(_Section):
    optimizer: Literal["FIRE", "BFGS", "LBFGS"] = Field(
        "BFGS",
        description="ASE optimiser, acting on atoms and cell together; BFGS converged 14-28 atom random "
        "cells in 0.6 times FIRE's potential calls (benchmarks/relaxation_settings.py)",
    )
    fmax: PositiveFloat = Field(0.05, description="force convergence threshold, eV/Å")
    max_steps: PositiveInt = 500
    extend_steps: int = Field(
        500,
        ge=0,
        description="further steps for a relaxation that reaches max_steps within extend_margin of the best "
        "enthalpy known when it started (or before any is known); 0: never",
    )
    extend_margin: PositiveFloat = Field(0.1, description="eV/atom")
    pressure_gpa: float = Field(0.0, description="external pressure; fitness becomes enthalpy per atom")
    relax_cell: bool = True
    rattle: float = Field(
        0.05,
        ge=0,
        le=0.5,
        description="Å: random displacement (normal, per Cartesian component) of every atom before relaxing; "
        "a symmetric start stays on its symmetric saddle under the optimiser, a rattle lets it fall off",
    )
    batch_size: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="candidates each worker relaxes at once with one batched potential call per optimiser "
        "step (docs/throughput.md); auto: 8 on a CPU, as many as a share of the GPU's memory holds on "
        "cuda (up to 256), and 1 for a potential that cannot batch (emt, chgnet, an ASE calculator "
        "without calculate_batch); a number above 1 needs a potential that batches",
    )


class ChecksConfig(_Section):
    """Geometry sanity bounds, applied before a relaxation and again to its result."""

    min_distance_factor: float = Field(
        0.6,
        gt=0,
        lt=2,
        description="closest allowed pair distance as a fraction of the sum of covalent radii",
    )
    volume_factor_range: tuple[float, float] = Field(
        (0.4, 8.0), description="allowed volume/atom relative to the mean covalent-sphere volume of the atoms"
    )

    @field_validator("volume_factor_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] < value[1]:
            raise ValueError("expected [low, high] with 0 < low < high")
        return value


class RandomSearchConfig(_Section):
    spacegroups: list[int] | None = Field(
        None, description="space groups to draw from; default all compatible with the composition"
    )
    volume_factor: PositiveFloat = Field(1.1, description="pyxtal volume factor for random cells")
    spacegroup_prior: Literal["uniform", "frequency"] = Field(
        "frequency",
        description="how space groups of random structures are drawn: half uniform over the compatible "
        "groups and half by how often each group occurs at this cell size among Materials Project "
        "structures (frequency; on the hard benchmark suite it more than halves the GA's relaxations to "
        "the ground state), or uniform over the compatible groups",
    )

    @field_validator("spacegroups")
    @classmethod
    def _valid_groups(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            bad = [g for g in value if not 1 <= g <= 230]
            if bad or not value:
                raise ValueError(f"space group numbers must be 1..230 (got {bad or value})")
        return value


class GAConfig(_Section):
    """Steady-state evolutionary algorithm (DEAP machinery, crystal operators in search/operators.py)."""

    population_size: PositiveInt = Field(20, description="structures kept in the breeding population")
    initial_random: PositiveInt | None = Field(
        None, description="random symmetric structures before breeding starts (default: population_size)"
    )
    tournament_size: int = Field(3, ge=2)
    operators: dict[str, float] = Field(
        default_factory=lambda: {
            "heredity": 0.4,
            "lattice_strain": 0.1,
            "permutation": 0.1,
            "coordinate": 0.1,
            "soft": 0.1,
            "symmetric": 0.1,
            "immigrant": 0.1,
        },
        description="relative probability of each variation operator",
    )
    adaptive_operators: bool = Field(
        True,
        description="shift operator probabilities toward the operators whose children enter the population "
        "(30% of the configured probabilities always stay)",
    )
    strain_sigma: PositiveFloat = 0.1
    coordinate_sigma: PositiveFloat = Field(0.4, description="Å")
    soft_amplitude: PositiveFloat = Field(1.0, description="Å")
    niche_energy_tol: PositiveFloat = Field(
        0.002, description="eV/atom: population members this close in energy and geometry share a niche"
    )

    @field_validator("operators")
    @classmethod
    def _known_operators(cls, value: dict[str, float]) -> dict[str, float]:
        # composition-changing operators (search/composition_operators.py) need chemical_system
        known = (*OPERATORS, *COMPOSITION_OPERATORS)
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown operator(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        if any(p < 0 for p in value.values()) or sum(value.values()) <= 0:
            raise ValueError("operator probabilities must be >= 0 with a positive sum")
        return value


class PSOConfig(_Section):
    """CALYPSO-style particle swarm over symmetric structures (search/pso.py)."""

    swarm_size: PositiveInt = 20
    inertia: float = Field(0.6, ge=0, le=1.5)
    cognitive: float = Field(1.5, ge=0, description="pull toward the particle's own best")
    social: float = Field(1.5, ge=0, description="pull toward the swarm's best")
    regenerate_fraction: float = Field(
        0.2, ge=0, le=1, description="worst particles re-drawn each generation"
    )


class ObjectiveConfig(_Section):
    """An extra objective beside enthalpy; with any, selection becomes NSGA-II and results a Pareto front."""

    name: str = Field(description="label used in results.csv")
    property: Literal["density", "volume_per_atom"] = Field(
        description="density (g/cm^3) or volume_per_atom (Å^3) of the relaxed structure"
    )
    target: float | None = Field(None, description="minimise |value - target|")
    goal: Literal["min", "max", "target"] = "target"

    @model_validator(mode="after")
    def _target_given(self) -> ObjectiveConfig:
        if self.goal == "target" and self.target is None:
            raise ValueError(f"objective {self.name!r}: goal 'target' needs a target value")
        return self


class DuplicatesConfig(_Section):
    ltol: PositiveFloat = 0.2
    stol: PositiveFloat = 0.3
    angle_tol: PositiveFloat = 5.0
    energy_tol: PositiveFloat = Field(
        0.01, description="eV/atom: relaxed structures further apart never match"
    )
    max_comparisons: PositiveInt | None = Field(
        32,
        description=(
            "StructureMatcher calls per duplicate query at most, on the structures nearest by fingerprint "
            "(null: compare every candidate the lattice conditions leave; exact, but grows with the archive)"
        ),
    )


class AnalysisConfig(_Section):
    symprec: PositiveFloat = Field(0.1, description="spglib tolerance for the reported space group, Å")


class EarlyStopConfig(_Section):
    """Stop relaxations clearly heading above the best enthalpy so far (globopt/evaluator/early_stop.py).

    Part of the surrogate: active when both ``surrogate.enabled`` and ``early_stop.enabled`` are true.
    """

    enabled: bool = True
    margin: PositiveFloat = Field(
        0.3, description="eV/atom: stop when the projected final enthalpy is this far above the current best"
    )
    min_steps: PositiveInt = Field(
        20, description="optimiser steps before a relaxation may be stopped (never fewer than 2 * window + 1)"
    )
    window: PositiveInt = Field(10, description="steps per window of the energy-decay extrapolation")
    known_minima: bool = Field(
        False,
        description="also stop a relaxation falling into one of the lowest known minima "
        "(globopt/evaluator/known_minima.py): geometry matching it under duplicates.*, enthalpy within "
        "known_minima_window above it, forces below known_minima_max_force",
    )
    known_minima_count: PositiveInt = Field(10, description="lowest known minima each relaxation watches for")
    known_minima_window: PositiveFloat = Field(0.03, description="eV/atom above a known minimum")
    known_minima_max_force: PositiveFloat = Field(0.5, description="eV/Å, largest force component")


class SurrogateConfig(_Section):
    """Gaussian-process surrogate that decides which proposals get relaxed (surrogates/gp.py)."""

    enabled: bool = False
    descriptor: Literal["rdf", "m3gnet", "m3gnet_embedding", "m3gnet_energy"] = Field(
        "rdf",
        description="structure descriptor: rdf (default, ~1 ms), or m3gnet* (one M3GNet pass per proposal on "
        "the master, ~15-80 ms; surrogates/descriptors.py says why rdf is the default)",
    )
    acquisition: Literal["lcb", "ei"] = Field(
        "lcb",
        description="how proposals are ranked: lcb (lowest mu - kappa*sigma) or ei (largest expected "
        "improvement below the best enthalpy so far; surrogates/acquisition.py says when they differ)",
    )
    kappa: float = Field(1.0, ge=0, description="lower confidence bound mu - kappa*sigma ranks proposals")
    candidates_per_slot: int = Field(
        6, ge=1, le=100, description="screened proposals drawn per free worker slot; the best LCB is relaxed"
    )
    min_points: int = Field(6, ge=3, description="relaxed structures before the GP starts ranking")
    refit_every: PositiveInt = Field(10, description="new points between hyperparameter refits (at least)")
    refit_growth: float = Field(0.1, ge=0, description="...or this fraction of the data, whichever is more")
    sparse_above: PositiveInt = Field(1000, description="points above which the GP becomes sparse (SGPR)")
    inducing_points: int = Field(200, ge=10, description="inducing points of the sparse GP")
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)


class OutputConfig(_Section):
    n_best: PositiveInt = Field(10, description="unique lowest-energy structures written to best/")


class InitialPopulationConfig(_Section):
    """First generation of a GA/PSO drawn partly from a trained generative model (generators/)."""

    generator: str | None = Field(
        None, description="'default' (shipped diffusion model), a shipped checkpoint name or a .pt path"
    )
    fraction: float = Field(0.5, ge=0, le=1, description="share of the first generation from the generator")
    sampling_steps: PositiveInt | None = Field(
        None, description="reverse-diffusion steps (default: the model's training steps)"
    )

    @field_validator("generator")
    @classmethod
    def _checkpoint_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not _checks_environment(info):
            return value
        from generators.checkpoint import CheckpointError, resolve_checkpoint

        try:
            resolve_checkpoint(value)
        except CheckpointError as exc:
            raise ValueError(str(exc)) from None
        return value


class RunConfig(_Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name; output goes to runs/<name>"
    )
    mode: Literal["random", "ga", "pso", "htvs"] = Field("random", description="search algorithm")
    # before composition: whether a composition is required depends on it
    chemical_system: list[str] | None = Field(
        None, description="search every composition of these elements (the convex hull); docs/hull.md"
    )
    atoms: tuple[int, int] | None = Field(
        None, description="atoms per cell with chemical_system: n or [low, high]"
    )
    composition: dict[str, int] | None = Field(
        None, description="formula string (Na4Cl4) or mapping {Na: 4, Cl: 4}; not used by mode htvs"
    )
    formula_units: tuple[int, int] | None = Field(
        None, description="search cells of n x composition for n in [low, high]; composition is then reduced"
    )
    seed: int = 0
    workers: PositiveInt = Field(1, description="local worker processes relaxing in parallel")
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    potential: PotentialConfig = Field(default_factory=PotentialConfig)
    relax: RelaxConfig = Field(default_factory=RelaxConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    random: RandomSearchConfig = Field(default_factory=RandomSearchConfig)
    ga: GAConfig = Field(default_factory=GAConfig)
    pso: PSOConfig = Field(default_factory=PSOConfig)
    objectives: list[ObjectiveConfig] = Field(default_factory=list)
    duplicates: DuplicatesConfig = Field(default_factory=DuplicatesConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    surrogate: SurrogateConfig = Field(default_factory=SurrogateConfig)
    initial_population: InitialPopulationConfig = Field(
        default_factory=InitialPopulationConfig, description="seed GA/PSO with a generative model"
    )
    htvs: HtvsConfig | None = Field(None, description="screening of substituted templates (mode: htvs)")
    hull: HullConfig | None = Field(None, description="variable-composition search (with chemical_system)")

    @field_validator("composition", mode="before")
    @classmethod
    def _parse_composition(cls, value: Any, info: ValidationInfo) -> dict[str, int] | None:
        if value is None:
            if "chemical_system" not in info.data:
                return None  # chemical_system itself is wrong: that is the error to report
            if info.data.get("mode") != "htvs" and info.data["chemical_system"] is None:
                # a screen enumerates its compositions, a chemical-system search chooses them
                raise PydanticCustomError("missing", "Field required")
            return None
        return parse_composition(value)

    @field_validator("chemical_system", mode="before")
    @classmethod
    def _parse_chemical_system(cls, value: Any) -> Any:
        return None if value is None else parse_chemical_system(value)

    @field_validator("atoms", mode="before")
    @classmethod
    def _parse_atoms(cls, value: Any) -> Any:
        return parse_atoms(value)

    @field_validator("atoms")
    @classmethod
    def _atoms_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        return check_atoms(value)

    @model_validator(mode="after")
    def _variable_composition(self) -> RunConfig:
        """chemical_system: the rules with other keys (hull/settings.py), defaults of its own."""
        if self.chemical_system is not None and self.hull is None:
            self.hull = HullConfig()
        check_variable_composition(self)
        if self.chemical_system is not None and "operators" not in self.ga.model_fields_set:
            self.ga = self.ga.model_copy(update={"operators": dict(VARIABLE_COMPOSITION_OPERATORS)})
        if self.chemical_system is not None and "spacegroup_prior" not in self.random.model_fields_set:
            # The frequency prior was measured on fixed-composition searches only; on the Cu-Au hull of
            # the test suite it found fewer compounds at the same budget. Uniform until measured.
            self.random = self.random.model_copy(update={"spacegroup_prior": "uniform"})
        return self

    @model_validator(mode="after")
    def _mode_inputs(self, info: ValidationInfo) -> RunConfig:
        """A search needs a composition; a screen needs an htvs section and enumerates its compositions."""
        if self.mode != "htvs":
            if self.htvs is not None:
                raise ValueError(
                    f"the htvs section applies to mode htvs only (mode is {self.mode}); remove it"
                )
            return self
        if self.htvs is None:
            raise ValueError("mode htvs needs an 'htvs' section (templates and substitutions)")
        if self.composition is not None or self.formula_units is not None:
            raise ValueError("mode htvs takes its compositions from htvs.templates; remove composition")
        if self.surrogate.enabled:
            # The GP ranks proposals by enthalpy per atom, which across a screen's many compositions
            # favours whichever chemistry binds hardest, not the candidates nearest their hull.
            raise ValueError("surrogate.enabled is not supported with mode htvs (yet); remove it")
        if "rattle" not in self.relax.model_fields_set:
            # A screen relaxes prototypes as given: a symmetric template is meant to stay symmetric.
            self.relax = self.relax.model_copy(update={"rattle": 0.0})
        if "evaluations" not in self.budget.model_fields_set:
            # A screen's natural budget is its whole enumeration; budget.evaluations caps it when given.
            self.budget = BudgetConfig(evaluations=HTVS_UNLIMITED_BUDGET)
        if not _checks_environment(info):
            return self
        from globopt.htvs.enumeration import Enumeration
        from surrogates.potentials import covered_elements

        try:
            covered = covered_elements(self.potential.kind, self.potential.model)
            Enumeration(self.htvs, covered).check_yields_candidates(self.htvs.stop_after)
        except ValueError as exc:  # TemplateError, EnumerationError, PartialSubstitutionError
            raise ValueError(str(exc) if str(exc).startswith("htvs.") else f"htvs: {exc}") from None
        return self

    @field_validator("formula_units", mode="before")
    @classmethod
    def _parse_formula_units(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, value)
        if isinstance(value, str) and "-" in value:
            low, _, high = value.partition("-")
            return (low.strip(), high.strip())
        return value

    @field_validator("formula_units")
    @classmethod
    def _ordered_units(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1 <= value[0] <= value[1]:
            raise ValueError("expected n or [low, high] with 1 <= low <= high")
        return value

    @model_validator(mode="after")
    def _generator_only_for_ga_pso(self) -> RunConfig:
        if self.initial_population.generator is None:
            return self
        if self.mode not in ("ga", "pso"):
            raise ValueError(
                f"initial_population.generator seeds the first generation of mode ga or pso, "
                f"not mode {self.mode}; remove it or change the mode"
            )
        from pymatgen.core import Element

        from generators.representation import MAX_Z

        beyond = [el for el in self.composition or {} if Element(el).Z > MAX_Z]
        if beyond:
            raise ValueError(
                f"initial_population.generator: the generators describe elements up to Z={MAX_Z}, not "
                f"{', '.join(beyond)}; remove initial_population or the element"
            )
        return self

    @model_validator(mode="after")
    def _formula_units_fit(self) -> RunConfig:
        if self.formula_units is None or self.composition is None:
            return self
        if not is_reduced(self.composition):
            raise ValueError(
                f"formula_units: with a formula-unit range, composition must be the reduced formula "
                f"(e.g. NaCl), got {self.formula}"
            )
        biggest = self.formula_units[1] * sum(self.composition.values())
        if biggest > MAX_ATOMS:
            raise ValueError(
                f"formula_units: {biggest} atoms in the largest cell; at most {MAX_ATOMS} allowed"
            )
        return self

    @model_validator(mode="after")
    def _batching_possible(self) -> RunConfig:
        from surrogates.potentials import can_batch

        size = self.relax.batch_size
        if size != "auto" and size > 1 and not can_batch(self.potential.kind, self.potential.calculator):
            what = self.potential.calculator if self.potential.kind == "ase" else self.potential.kind
            raise ValueError(
                f"relax.batch_size: {size} needs a potential that evaluates several structures in one call "
                f"(potential.kind matgl, or an ASE calculator class with a calculate_batch method); "
                f"{what} cannot: set relax.batch_size to 1 or auto"
            )
        return self

    @model_validator(mode="after")
    def _potential_usable(self, info: ValidationInfo) -> RunConfig:
        """The potential resolves (model folder found and intact, calculator importable) and covers the
        composition's elements."""
        if not _checks_environment(info):
            return self
        covered = self.potential.check_available()
        if covered is not None and self.composition is not None:
            missing = [el for el in self.composition if el not in covered]
            if missing:
                raise ValueError(
                    f"composition: element(s) {', '.join(missing)} not covered by the potential "
                    f"({self.potential.label}); it covers: {' '.join(sorted(covered))}"
                )
        return self

    @property
    def formula(self) -> str:
        if self.chemical_system is not None:
            low, high = self.atoms
            return f"{'-'.join(self.chemical_system)} ({low}-{high} atoms per cell)"
        if self.composition is None:
            return "(from htvs templates)"
        text = formula_string(self.composition)
        if self.formula_units:
            low, high = self.formula_units
            text += f" x {low}-{high}" if high > low else f" x {low}"
        return text

    @property
    def budget_text(self) -> str:
        """How the run ends, as a user wrote it (a screen without a budget runs to the end of its
        enumeration)."""
        budget = self.budget
        unlimited = budget.evaluations >= HTVS_UNLIMITED_BUDGET
        text = "the whole enumeration" if unlimited else f"{budget.evaluations} evaluations"
        if budget.target_enthalpy_per_atom is not None:
            text += f" or enthalpy <= {budget.target_enthalpy_per_atom:g} eV/atom"
        if budget.force_calls is not None:
            text += f" or {budget.force_calls} force calls"
        return text

    @property
    def cell_contents(self) -> list[dict[str, int]]:
        """Every cell content the search may build (none given up front for htvs)."""
        if self.composition is None:
            return []
        return cell_contents(self.composition, self.formula_units)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error.

    Plain YAML keeps the last of two ``budget:`` sections without a word, so half of what the user wrote
    would be ignored.
    """


def _mapping_without_repeats(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            first = seen.setdefault(key, line)
        except TypeError:  # an unhashable key: let the default constructor report it
            continue
        if first != line:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} appears twice (lines {first} and {line}); keep one",
                key_node.start_mark,
            )
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def read_yaml_mapping(path: Path, what: str, expected_keys: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file; ConfigError when it is missing, not YAML or not a mapping.

    ``what`` names the file in the message ("config file"), ``expected_keys`` hints at its top-level keys.
    A key repeated within one mapping is an error too.
    """
    if path.is_dir():
        hint = (
            f"; to continue that run use `globopt resume {path}`"
            if (path / "archive.sqlite").exists()
            else (
                f" (it holds {path / 'config.yaml'}: give that file)"
                if (path / "config.yaml").is_file()
                else ""
            )
        )
        raise ConfigError(f"{what} {path} is a directory, not a YAML file{hint}")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        with open(path) as handle:  # a stream, so that YAML's messages name the file
            data = yaml.load(handle, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys ({expected_keys}, ...) at the top level")
    return data


def load_config(path: str | Path, check_environment: bool = True) -> RunConfig:
    """Read and validate a YAML config; raise ConfigError with every problem named by key.

    ``check_environment=False`` skips the checks that look outside the file (model, templates, calculator):
    for reading what a finished run was, on a machine that may not have its model.
    """
    path = Path(path)
    data = read_yaml_mapping(path, "config file", "name, mode, composition")
    base = path.resolve().parent
    return parse_config(
        resolve_hull_paths(resolve_paths(data, base), base),
        source=str(path),
        check_environment=check_environment,
    )


def parse_config(data: dict[str, Any], source: str = "config", check_environment: bool = True) -> RunConfig:
    try:
        return RunConfig.model_validate(data, context={CHECK_ENVIRONMENT: check_environment})
    except ValidationError as exc:
        lines = [_describe_error(err) for err in exc.errors()]
        raise ConfigError(
            f"{source}: {len(lines)} problem(s):\n" + "\n".join(f"  - {ln}" for ln in lines)
        ) from None


def _describe_error(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"unknown key '{key}'{did_you_mean}; allowed here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"'{key}' is required"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        return f"'{key}': {message}, got {err.get('input')!r}"
    if not loc:
        return message
    return f"'{key}': {message} (got {err.get('input')!r})"


def _allowed_keys(section_path: list[str]) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in section_path:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
