"""Which proposals deserve a relaxation: the GP's lower confidence bound, and the surrogate's life cycle.

The engine draws several screened proposals per free worker slot; the surrogate predicts each one's
relaxed enthalpy per atom (mean ``mu``, standard deviation ``sigma``) and only the proposal with the
lowest ``mu - kappa * sigma`` is relaxed. ``kappa`` trades exploitation (low predicted energy) against
exploration (structures unlike anything relaxed so far); the others are recorded as ``skipped``.

The surrogate learns only from the archive: every relaxed candidate contributes (descriptor of its
*initial* structure, relaxed enthalpy per atom), in commit order. On resume it is rebuilt from the archive
rows in the same order, so there is no separate surrogate state that could go stale (see gp.py for why
the rebuilt model makes the same decisions). Also tried, and dropped because it did not help
(docs/surrogate.md): teaching the GP each relaxed structure itself, and the projected enthalpy of relaxations
stopped early.

Two acquisition functions (``surrogate.acquisition``):

* ``lcb``: lowest ``mu - kappa * sigma``;
* ``ei``: highest expected improvement below the best enthalpy found so far,
  ``E[max(0, best - y)]`` under the predictive Gaussian. A proposal confidently predicted to relax to
  the best known minimum (a near copy of it) has nearly zero EI, while LCB ranks it first. Such a
  relaxation can only rediscover that minimum. On 8-atom ZnO (docs/surrogate.md) it gained nothing
  over LCB, because most proposals get nearly the prior's mu and sigma and both functions then agree;
  LCB stays the default.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Composition, Structure
from scipy.stats import norm

from surrogates.descriptors import make_descriptor
from surrogates.gp import GPSettings, GPSurrogate


@dataclass(frozen=True)
class Prediction:
    mu: float  # predicted relaxed enthalpy, eV/atom
    sigma: float  # predictive standard deviation, eV/atom
    lcb: float  # mu - kappa * sigma
    ei: float  # expected improvement below the best enthalpy so far, eV/atom (NaN without a best)
    score: float  # what the acquisition ranks by, lower is more promising (lcb, or -ei)

    def as_dict(self) -> dict[str, float]:
        return {"mu": self.mu, "sigma": self.sigma, "lcb": self.lcb, "ei": self.ei}


def lower_confidence_bound(mu: np.ndarray, sigma: np.ndarray, kappa: float) -> np.ndarray:
    return np.asarray(mu) - kappa * np.asarray(sigma)


def expected_improvement(mu: np.ndarray, sigma: np.ndarray, best: float) -> np.ndarray:
    """E[max(0, best - y)] for y ~ N(mu, sigma^2), eV/atom."""
    mu, sigma = np.asarray(mu, dtype=float), np.maximum(np.asarray(sigma, dtype=float), 1e-12)
    gap = best - mu
    z = gap / sigma
    return gap * norm.cdf(z) + sigma * norm.pdf(z)


def learned_points(status: str, enthalpy_per_atom: float | None, initial_json: str | None) -> list:
    """(initial structure JSON, enthalpy per atom) pairs one outcome teaches the surrogate, in order.

    One function for the running engine and the rebuild on resume, so both learn exactly the same points.
    """
    if str(status) == "relaxed":
        return [(initial_json, enthalpy_per_atom)]
    return []


class FormationReferences:
    """Elemental energies that turn enthalpies per atom into formation enthalpies, for a GP over a chemical
    system.

    Across the compositions of a chemical system the enthalpy per atom runs roughly linearly from one
    element's to the other's (M3GNet: Al -3.7, Ni -5.7 eV/atom), a trend a stationary GP with a constant mean
    models badly; the formation enthalpy removes it. The reference of each element is the first relaxed
    structure of that pure element in commit order (the elemental references, which a variable-composition
    run relaxes first), so it never changes once known; points that arrive before every element has one wait
    and are learned, in order, once the last one is there. The running engine and the rebuild on resume see
    the same order, so they learn the same points.
    """

    def __init__(self, elements: Iterable[str]) -> None:
        self.elements = tuple(elements)
        self.energy: dict[str, float] = {}

    def observe(self, formula: str, enthalpy_per_atom: float) -> None:
        composition = Composition(formula)
        if len(composition.elements) == 1:
            self.energy.setdefault(composition.elements[0].symbol, enthalpy_per_atom)

    @property
    def complete(self) -> bool:
        return all(el in self.energy for el in self.elements)

    def shift(self, formula: str) -> float:
        """Enthalpy per atom of the composition-weighted elements: enthalpy = formation + shift."""
        composition = Composition(formula)
        return sum(
            composition.get_atomic_fraction(el) * self.energy[el.symbol] for el in composition.elements
        )


class SurrogateScreen:
    """Descriptor + GP + LCB ranking, fed from the archive."""

    def __init__(
        self,
        elements: Iterable[str],
        descriptor: str,
        kappa: float,
        gp: GPSettings,
        model: str | None = None,
        acquisition: str = "lcb",
        formation: bool = False,
    ) -> None:
        # model: the matgl model the M3GNet descriptors run (None: the default M3GNet); loaded at the first
        # descriptor call, once per process
        self.describe = make_descriptor(descriptor, elements, model)
        self.kappa = kappa
        if acquisition not in ("lcb", "ei"):
            raise ValueError(f"unknown acquisition {acquisition!r}; expected 'lcb' or 'ei'")
        self.acquisition = acquisition
        self.gp = GPSurrogate(gp)
        # formation: the GP learns formation enthalpies (a search over a chemical system)
        self.references = FormationReferences(elements) if formation else None
        self._waiting: list[tuple[np.ndarray, str, float]] = []
        self.seconds = 0.0  # master time spent describing, fitting and predicting (for the overhead report)

    @classmethod
    def from_config(cls, config, background_refit: bool = False) -> SurrogateScreen:
        """``background_refit``: see gp.py; the engine sets it when several workers share the master."""
        # RunConfig validation guarantees a composition here: it rejects surrogate.enabled with mode htvs.
        s = config.surrogate
        settings = GPSettings(
            min_points=s.min_points,
            refit_every=s.refit_every,
            refit_growth=s.refit_growth,
            sparse_above=s.sparse_above,
            inducing_points=s.inducing_points,
            seed=config.seed,
            background_refit=background_refit,
        )
        # the M3GNet descriptors use the run's own model when it relaxes with matgl (it is loaded already),
        # else (EMT, CHGNet, any ASE calculator) the default M3GNet
        model = config.potential.model if config.potential.kind == "matgl" else None
        system = config.chemical_system
        elements = config.composition if system is None else system
        return cls(
            elements, s.descriptor, s.kappa, settings, model, s.acquisition, formation=system is not None
        )

    @property
    def ready(self) -> bool:
        return self.gp.ready

    def descriptor(self, structure: Structure) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.describe(structure)
        finally:
            self.seconds += time.perf_counter() - started

    def learn(self, descriptor: np.ndarray, enthalpy_per_atom: float) -> None:
        self.gp.add(descriptor, enthalpy_per_atom)

    def learn_result(
        self,
        status: str,
        enthalpy_per_atom: float | None,
        initial_json: str | None,
        initial_descriptor: np.ndarray | None = None,
        formula: str | None = None,
    ) -> int:
        """Learn what one outcome teaches (learned_points); returns the number of points added.

        ``initial_descriptor``: the descriptor of the initial structure when the caller has it already
        (computed for the ranking), so it is neither parsed nor computed twice. ``formula``: the structure's
        composition, which a GP of formation enthalpies needs (parsed from the structure when not given).
        """
        from globopt.structure_codec import structure_from_json

        points = learned_points(status, enthalpy_per_atom, initial_json)
        learned = 0
        for index, (structure_json, enthalpy) in enumerate(points):
            structure = None
            if index == 0 and initial_descriptor is not None:
                descriptor = initial_descriptor
            else:
                structure = structure_from_json(structure_json)
                descriptor = self.descriptor(structure)
            if self.references is None:
                self.learn(descriptor, enthalpy)
                learned += 1
                continue
            if formula is None:
                structure = structure or structure_from_json(structure_json)
                formula = structure.composition.reduced_formula
            self.references.observe(formula, enthalpy)
            self._waiting.append((descriptor, formula, enthalpy))
            if self.references.complete:
                for waiting_descriptor, waiting_formula, waiting_enthalpy in self._waiting:
                    self.learn(waiting_descriptor, waiting_enthalpy - self.references.shift(waiting_formula))
                    learned += 1
                self._waiting.clear()
        return learned

    def rebuild(self, archive) -> int:
        """Learn every finished candidate of an archive, in commit order; returns the points learned."""
        count = 0
        for record in archive.relaxed_in_commit_order():
            count += self.learn_result(
                record.status, record.enthalpy_per_atom, record.initial_json, formula=record.formula
            )
        return count

    def rank(
        self,
        descriptors: Sequence[np.ndarray],
        best: float | None = None,
        formulas: Sequence[str] | None = None,
        hulls: Sequence[float | None] | None = None,
    ) -> list[Prediction]:
        """Predictions with their acquisition score; ``best``: lowest enthalpy per atom so far (for EI).

        Over a chemical system (``formulas`` and ``hulls`` given: each proposal's composition and the hull's
        enthalpy per atom there) the GP's formation enthalpies are turned back into enthalpies, and proposals
        are ranked by predicted distance to the hull: LCB minus the hull, EI below the hull."""
        started = time.perf_counter()
        try:
            mu, sigma = self.gp.predict(np.vstack(descriptors))
        finally:
            self.seconds += time.perf_counter() - started
        baseline, relative = np.zeros(len(mu)), False
        if self.references is not None and formulas is not None and self.references.complete:
            mu = mu + np.array([self.references.shift(f) for f in formulas])
            if hulls is not None and all(h is not None for h in hulls):
                baseline, relative = np.array(hulls, dtype=float), True
        lcb = lower_confidence_bound(mu, sigma, self.kappa)
        if relative:
            ei = expected_improvement(mu - baseline, sigma, 0.0)
        else:
            ei = expected_improvement(mu, sigma, best) if best is not None else np.full(len(mu), math.nan)
        score = -ei if self.acquisition == "ei" and (best is not None or relative) else lcb - baseline
        return [
            Prediction(float(m), float(s), float(b), float(e), float(c))
            for m, s, b, e, c in zip(mu, sigma, lcb, ei, score, strict=True)
        ]
