"""One interface over every energy model the engine can relax with.

The engine only ever asks for "an ASE calculator for this potential config"; whether that is M3GNet
through matgl, CHGNet, or ASE's EMT for fast tests is decided here. Calculators are built once per
process (model loads cost seconds) and wrapped so every call is counted and timed: the fraction of
wall time spent inside the potential is how we know the rest of the engine is not the bottleneck.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from ase.calculators.calculator import BaseCalculator, Calculator, all_changes

if TYPE_CHECKING:
    from ase import Atoms

# ASE's EMT has parameters for exactly these elements.
EMT_ELEMENTS = frozenset({"Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt", "H", "C", "N", "O"})

_CACHE: dict[tuple, Calculator] = {}


class PotentialUnavailableError(RuntimeError):
    """The requested potential cannot be built here (missing package, unknown class)."""


class PotentialBuildError(RuntimeError):
    """Building the potential on a worker failed (a broken model file, a bad calculator argument).

    Raised on the worker and re-raised on rank 0 (it pickles), where the CLI reports it as the user's to fix.
    """


@runtime_checkable
class BatchPotential(Protocol):
    """A potential that evaluates several structures in one call (globopt/evaluator/batch_relax.py).

    Returns, per structure and in order, a dict with ``energy`` (eV), ``forces`` (eV/Å, (N, 3)) and
    ``stress`` (Voigt, eV/Å³, ASE's sign), the results an ASE calculator would give for that structure
    alone. Any ASE calculator class with such a ``calculate_batch`` method is batched by globopt
    (``potential.kind: ase``); matgl's M3GNet is (surrogates/m3gnet_batch.py).
    """

    def calculate_batch(self, atoms_list: Sequence[Atoms]) -> list[dict[str, Any]]: ...


def batch_potential(calculator: Calculator) -> BatchPotential | None:
    """The calculator as a batched potential, or None when it can only take one structure per call."""
    return calculator if isinstance(calculator, BatchPotential) else None


def can_batch(kind: str, calculator: str | None = None) -> bool:
    """Whether a potential config batches, decided without loading a model (config validation)."""
    if kind == "matgl":
        return True
    if kind == "ase" and calculator:
        try:
            cls = _import_calculator(calculator)
        except PotentialUnavailableError:
            return False
        return callable(getattr(cls, "calculate_batch", None))
    return False


def device_problem(device: str) -> str:
    """Why a potential cannot run on ``device`` here ('' when it can): cpu, cuda or cuda:N that exists."""
    name, _, index = device.partition(":")
    if name == "cpu" and not index:
        return ""
    if name != "cuda" or (index and not index.isdigit()):
        return f"unknown device {device!r}; expected cpu, cuda or cuda:N"
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return f"device {device!r}: no CUDA device is visible here (torch {torch.__version__}); use cpu"
    if index and int(index) >= count:
        return f"device {device!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})"
    return ""


def covered_elements(kind: str, model: str | None) -> frozenset[str] | None:
    """Elements the potential has parameters for, or None when unknown without loading it."""
    if kind == "emt":
        return EMT_ELEMENTS
    if kind == "matgl":
        from surrogates.m3gnet import ModelLoadError, model_elements

        try:
            return model_elements(str(model))
        except ModelLoadError:  # a damaged folder: check_potential names it where it matters
            return None
    return None


def check_potential(kind: str, model: str | None, calculator: str | None) -> frozenset[str] | None:
    """Check that the potential can be built here, without building it; the elements it covers if known.

    Raises PotentialUnavailableError naming what is missing (a model folder, a damaged file, a package, a
    calculator class), so that `globopt validate` and the start of a run say it before any work is done.
    """
    if kind == "emt":
        return EMT_ELEMENTS
    if kind == "matgl":
        from surrogates.m3gnet import ModelLoadError, ModelNotFoundError, check_model

        try:
            return check_model(str(model))
        except (ModelNotFoundError, ModelLoadError) as exc:
            raise PotentialUnavailableError(f"potential.model: {exc}") from None
    if kind == "chgnet":
        if importlib.util.find_spec("chgnet") is None:
            raise PotentialUnavailableError(
                "potential.kind=chgnet needs the chgnet package: pip install 'globopt[chgnet]'"
            )
        return None
    if kind == "ase":
        _import_calculator(str(calculator))
        return None
    raise PotentialUnavailableError(f"unknown potential kind {kind!r}; expected matgl, emt, chgnet or ase")


def build_calculator(
    kind: str,
    model: str | None,
    calculator: str | None = None,
    calculator_kwargs: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Calculator:
    """Return the (cached, per-process) ASE calculator for a potential configuration."""
    key = (kind, model, calculator, repr(sorted((calculator_kwargs or {}).items())), device)
    if key not in _CACHE:
        _CACHE[key] = _build(kind, model, calculator, calculator_kwargs or {}, device)
    return _CACHE[key]


def _build(
    kind: str, model: str | None, calculator: str | None, kwargs: dict[str, Any], device: str
) -> Calculator:
    if kind == "matgl":
        from surrogates.m3gnet import make_calculator

        return make_calculator(str(model), device=device)
    if kind == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if kind == "chgnet":
        try:
            from chgnet.model.dynamics import CHGNetCalculator
        except ImportError as exc:
            raise PotentialUnavailableError(
                "potential.kind=chgnet needs the chgnet package: pip install 'globopt[chgnet]'"
            ) from exc
        return CHGNetCalculator(use_device=device, **kwargs)
    if kind == "ase":
        return _import_calculator(str(calculator))(**kwargs)
    raise PotentialUnavailableError(f"unknown potential kind {kind!r}; expected matgl, emt, chgnet or ase")


def _import_calculator(path: str) -> type[Calculator]:
    module_name, _, class_name = path.partition(":")
    if not class_name:
        raise PotentialUnavailableError(
            f"potential.calculator {path!r} must look like 'package.module:ClassName'"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise PotentialUnavailableError(
            f"potential.calculator: cannot import ASE calculator {path!r}: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseCalculator)):
        raise PotentialUnavailableError(
            f"potential.calculator: {path!r} is not an ASE calculator class (a subclass of "
            f"ase.calculators.calculator.BaseCalculator)"
        )
    return cls


def exact_system_changes(cached: Atoms | None, atoms: Atoms) -> list[str]:
    """What changed between the configuration a calculator's results are for and ``atoms``.

    ASE's ``compare_atoms`` answers the same question with ``np.allclose`` at an absolute tolerance of
    1e-15, which for coordinates of a few Å is exact equality, but costs about 0.14 ms per call; an
    optimiser step with a cell filter asks four to six times (energy, forces and stress for the
    convergence test and again for the step), which made the check a sixth of a batched M3GNet
    relaxation's CPU time on 8-atom cells. Exact comparison gives the same verdicts in 14 µs.
    """
    if cached is None:
        return list(all_changes)
    changes = []
    if not np.array_equal(cached.cell.array, atoms.cell.array):
        changes.append("cell")
    if not np.array_equal(cached.pbc, atoms.pbc):
        changes.append("pbc")
    arrays1, arrays2 = cached.arrays, atoms.arrays
    for name in all_changes:
        if name in ("cell", "pbc"):
            continue
        first, second = arrays1.get(name), arrays2.get(name)
        if first is None and second is None:
            continue
        if first is None or second is None or not np.array_equal(first, second):
            changes.append(name)
    return changes


class ExactStateCheck:
    """Mixin for an ASE ``Calculator``: the exact (and cheap) state check of ``exact_system_changes``."""

    atoms: Atoms | None
    ignored_changes: set[str]

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        changes = exact_system_changes(self.atoms, atoms)
        return [c for c in changes if c not in self.ignored_changes] if self.ignored_changes else changes


class TimedCalculator(ExactStateCheck, Calculator):
    """Delegates to another calculator, counting calls and the seconds spent in them.

    A relaxation's force-call count is the honest cost measure (surrogates are judged by it), and the
    time inside versus outside the potential shows where the engine's overhead is.
    """

    def __init__(self, inner: Calculator) -> None:
        super().__init__()
        self.inner = inner
        self.implemented_properties = list(inner.implemented_properties)
        self.calls = 0
        self.seconds = 0.0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        start = time.perf_counter()
        self.inner.calculate(self.atoms.copy(), properties, system_changes)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.results = dict(self.inner.results)
