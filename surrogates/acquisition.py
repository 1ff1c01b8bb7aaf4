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
from pymatgen.core import Structure
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
    ) -> None:
        # model: the matgl model the M3GNet descriptors run (None: the default M3GNet); loaded at the first
        # descriptor call, once per process
        self.describe = make_descriptor(descriptor, elements, model)
        self.kappa = kappa
        if acquisition not in ("lcb", "ei"):
            raise ValueError(f"unknown acquisition {acquisition!r}; expected 'lcb' or 'ei'")
        self.acquisition = acquisition
        self.gp = GPSurrogate(gp)
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
        return cls(config.composition, s.descriptor, s.kappa, settings, model, s.acquisition)

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
    ) -> int:
        """Learn what one outcome teaches (learned_points); returns the number of points added.

        ``initial_descriptor``: the descriptor of the initial structure when the caller has it already
        (computed for the ranking), so it is neither parsed nor computed twice.
        """
        from globopt.structure_codec import structure_from_json

        points = learned_points(status, enthalpy_per_atom, initial_json)
        for index, (structure_json, enthalpy) in enumerate(points):
            if index == 0 and initial_descriptor is not None:
                descriptor = initial_descriptor
            else:
                descriptor = self.descriptor(structure_from_json(structure_json))
            self.learn(descriptor, enthalpy)
        return len(points)

    def rebuild(self, archive) -> int:
        """Learn every finished candidate of an archive, in commit order; returns the points learned."""
        count = 0
        for record in archive.relaxed_in_commit_order():
            count += self.learn_result(record.status, record.enthalpy_per_atom, record.initial_json)
        return count

    def rank(self, descriptors: Sequence[np.ndarray], best: float | None = None) -> list[Prediction]:
        """Predictions with their acquisition score; ``best``: lowest enthalpy per atom so far (for EI)."""
        started = time.perf_counter()
        try:
            mu, sigma = self.gp.predict(np.vstack(descriptors))
        finally:
            self.seconds += time.perf_counter() - started
        lcb = lower_confidence_bound(mu, sigma, self.kappa)
        ei = expected_improvement(mu, sigma, best) if best is not None else np.full(len(mu), math.nan)
        score = -ei if self.acquisition == "ei" and best is not None else lcb
        return [
            Prediction(float(m), float(s), float(b), float(e), float(c))
            for m, s, b, e, c in zip(mu, sigma, lcb, ei, score, strict=True)
        ]
