"""Which proposals deserve a relaxation: the GP's lower confidence bound, and the surrogate's life cycle.

The engine draws several screened proposals per free worker slot; the surrogate predicts each one's
relaxed enthalpy per atom (mean ``mu``, standard deviation ``sigma``) and only the proposal with the
lowest ``mu - kappa * sigma`` is relaxed. ``kappa`` trades exploitation (low predicted energy) against
exploration (structures unlike anything relaxed so far); the others are recorded as ``skipped``.

The surrogate learns only from the archive: every relaxed candidate contributes (descriptor of its
*initial* structure, relaxed enthalpy per atom), in commit order. On resume it is rebuilt from the archive
rows in the same order, so there is no separate surrogate state that could go stale (see gp.py for why
the rebuilt model makes the same decisions).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Structure

from surrogates.descriptors import make_descriptor
from surrogates.gp import GPSettings, GPSurrogate


@dataclass(frozen=True)
class Prediction:
    mu: float  # predicted relaxed enthalpy, eV/atom
    sigma: float  # predictive standard deviation, eV/atom
    lcb: float  # mu - kappa * sigma, the ranking score (lower is more promising)

    def as_dict(self) -> dict[str, float]:
        return {"mu": self.mu, "sigma": self.sigma, "lcb": self.lcb}


def lower_confidence_bound(mu: np.ndarray, sigma: np.ndarray, kappa: float) -> np.ndarray:
    return np.asarray(mu) - kappa * np.asarray(sigma)


class SurrogateScreen:
    """Descriptor + GP + LCB ranking, fed from the archive."""

    def __init__(
        self,
        elements: Iterable[str],
        descriptor: str,
        kappa: float,
        gp: GPSettings,
        model: str | None = None,
    ) -> None:
        # model: the matgl model the M3GNet descriptors run (None: the default M3GNet); loaded at the first
        # descriptor call, once per process
        self.describe = make_descriptor(descriptor, elements, model)
        self.kappa = kappa
        self.gp = GPSurrogate(gp)
        self.seconds = 0.0  # master time spent describing, fitting and predicting (for the overhead report)

    @classmethod
    def from_config(cls, config) -> SurrogateScreen:
        # RunConfig validation guarantees a composition here: it rejects surrogate.enabled with mode htvs.
        s = config.surrogate
        settings = GPSettings(
            min_points=s.min_points,
            refit_every=s.refit_every,
            refit_growth=s.refit_growth,
            sparse_above=s.sparse_above,
            inducing_points=s.inducing_points,
            seed=config.seed,
        )
        # the M3GNet descriptors use the run's own model when it relaxes with matgl (it is loaded already),
        # else (EMT, CHGNet, any ASE calculator) the default M3GNet
        model = config.potential.model if config.potential.kind == "matgl" else None
        return cls(config.composition, s.descriptor, s.kappa, settings, model)

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

    def rebuild(self, archive) -> int:
        """Learn every relaxed candidate of an archive, in commit order; returns the number learned."""
        from globopt.archive import structure_from_json

        count = 0
        # finished_at is stamped at commit, so this is the order the running engine learned them in
        rows = archive.db.execute(
            "SELECT initial, enthalpy_per_atom FROM candidates WHERE status='relaxed'"
            " ORDER BY finished_at, id"
        )
        for row in rows:
            self.learn(self.descriptor(structure_from_json(row["initial"])), row["enthalpy_per_atom"])
            count += 1
        return count

    def rank(self, descriptors: Sequence[np.ndarray]) -> list[Prediction]:
        started = time.perf_counter()
        try:
            mu, sigma = self.gp.predict(np.vstack(descriptors))
        finally:
            self.seconds += time.perf_counter() - started
        lcb = lower_confidence_bound(mu, sigma, self.kappa)
        return [Prediction(float(m), float(s), float(b)) for m, s, b in zip(mu, sigma, lcb, strict=True)]
