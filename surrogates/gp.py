"""Gaussian-process regression of relaxed enthalpy per atom on structure descriptors (gpytorch).

Two regimes, one interface:

* up to ``sparse_above`` training points an exact GP (constant mean, scaled RBF kernel, Gaussian noise);
* beyond, SGPR (Titsias 2009) through gpytorch's ``InducingPointKernel``: the training covariance is
  replaced by a rank-``inducing_points`` approximation, so fitting and conditioning cost O(n m^2) instead
  of O(n^3) and a run of thousands of relaxations never pays a cubic bill.

Hyperparameters are refitted on a schedule, not after every evaluation: the first fit at ``min_points``,
then whenever the data have grown by ``refit_every`` points or by ``refit_growth`` times the size of the
last fit, whichever is more (the geometric part keeps the amortised cost per evaluation flat as the
archive grows). Between refits new points are only conditioned on (posterior update, no optimisation).

Every fit starts from the same initial hyperparameters and sees exactly the first ``k`` points in the
order they were added (the schedule fixes ``k``), so the model is a pure function of the ordered data:
rebuilding it from the archive on resume reproduces the decisions of the run that was killed, with no
separate surrogate state to keep in sync. Everything runs in float64 on the CPU with one torch thread
(the master must not compete with the workers for cores).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.preprocessing import StandardScaler

# Adam steps per hyperparameter fit, and its learning rate on the (softplus-transformed) raw parameters.
TRAIN_ITERATIONS = 60
LEARNING_RATE = 0.1
# Observation noise floor (standardised units): keeps the Cholesky factorisation of near-duplicate
# descriptors stable.
NOISE_FLOOR = 1e-4


@dataclass(frozen=True)
class GPSettings:
    min_points: int = 10
    refit_every: int = 10
    refit_growth: float = 0.1
    sparse_above: int = 1000
    inducing_points: int = 200
    seed: int = 0


@dataclass
class GPTimings:
    """Seconds spent in the last fit/condition/predict: the engine reports them against relaxation time."""

    fit: float = 0.0
    condition: float = 0.0
    predict: float = 0.0
    fits: int = 0


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_sizes(settings: GPSettings, n: int) -> int:
    """Number of leading points the hyperparameters are fitted on when ``n`` points are known (0: none)."""
    size = settings.min_points
    if n < size:
        return 0
    while True:
        following = max(size + settings.refit_every, int(np.ceil(size * (1 + settings.refit_growth))))
        if following > n:
            return size
        size = following


class GPSurrogate:
    """Predicts relaxed enthalpy per atom (mean and standard deviation, eV/atom) from descriptors."""

    def __init__(self, settings: GPSettings | None = None) -> None:
        self.settings = settings or GPSettings()
        self._x: list[np.ndarray] = []
        self._y: list[float] = []
        self._fitted_on = 0  # leading points the current hyperparameters were fitted on
        self._conditioned_on = 0  # points the current posterior has seen
        self._model = None
        self._likelihood = None
        self._x_scaler: StandardScaler | None = None
        self._y_scaler: StandardScaler | None = None
        self.timings = GPTimings()

    # -- data ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._y)

    def add(self, descriptor: np.ndarray, enthalpy_per_atom: float) -> None:
        if not np.isfinite(enthalpy_per_atom) or not np.all(np.isfinite(descriptor)):
            return  # a failed relaxation carries no information about the energy surface
        self._x.append(np.asarray(descriptor, dtype=np.float64))
        self._y.append(float(enthalpy_per_atom))

    @property
    def ready(self) -> bool:
        return len(self._y) >= self.settings.min_points

    @property
    def sparse(self) -> bool:
        return self._fitted_on > self.settings.sparse_above

    # -- model -----------------------------------------------------------------------------------
    def predict(self, descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation (including observation noise) of the relaxed enthalpy."""
        if not self.ready:
            raise RuntimeError(f"the GP needs {self.settings.min_points} points, has {len(self._y)}")
        import gpytorch
        import torch

        with _one_torch_thread():
            self._update()
            started = time.perf_counter()
            x = torch.as_tensor(self._x_scaler.transform(np.atleast_2d(descriptors)), dtype=torch.float64)
            self._model.eval()
            self._likelihood.eval()
            with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
                output = self._likelihood(self._model(x))
                mean = output.mean.numpy()
                std = output.variance.clamp_min(0).sqrt().numpy()
            scale = float(self._y_scaler.scale_[0])
            self.timings.predict = time.perf_counter() - started
        return mean * scale + float(self._y_scaler.mean_[0]), std * scale

    def _update(self) -> None:
        n = len(self._y)
        target = fit_sizes(self.settings, n)
        if target != self._fitted_on or self._model is None:
            self._fit(target)
        if self._conditioned_on != n:
            started = time.perf_counter()
            x, y = self._scaled(n)
            self._model.set_train_data(x, y, strict=False)
            self._conditioned_on = n
            self.timings.condition = time.perf_counter() - started

    def _scaled(self, n: int):
        import torch

        x = torch.as_tensor(self._x_scaler.transform(np.vstack(self._x[:n])), dtype=torch.float64)
        y = torch.as_tensor(
            self._y_scaler.transform(np.asarray(self._y[:n])[:, None])[:, 0], dtype=torch.float64
        )
        return x, y

    def _fit(self, size: int) -> None:
        import gpytorch
        import torch

        started = time.perf_counter()
        self._x_scaler = StandardScaler().fit(np.vstack(self._x[:size]))
        self._y_scaler = StandardScaler().fit(np.asarray(self._y[:size])[:, None])
        x, y = self._scaled(size)
        likelihood = gpytorch.likelihoods.GaussianLikelihood(
            noise_constraint=gpytorch.constraints.GreaterThan(NOISE_FLOOR)
        ).double()
        inducing = None
        if size > self.settings.sparse_above:
            rng = np.random.default_rng(self.settings.seed + size)
            m = min(self.settings.inducing_points, size)
            inducing = x[torch.as_tensor(np.sort(rng.choice(size, m, replace=False)))].clone()
        model = _Model(x, y, likelihood, inducing).double()
        # same starting point for every fit: the model is a function of its data only (see module doc)
        dims = x.shape[1]
        model.covar_module_base.base_kernel.lengthscale = float(np.sqrt(dims))
        model.covar_module_base.outputscale = 1.0
        likelihood.noise = 0.05
        model.train()
        likelihood.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        for _ in range(TRAIN_ITERATIONS):
            optimizer.zero_grad()
            loss = -mll(model(x), y)
            loss.backward()
            optimizer.step()
        self._model, self._likelihood = model, likelihood
        self._fitted_on = size
        self._conditioned_on = size
        self.timings.fit = time.perf_counter() - started
        self.timings.fits += 1

    def hyperparameters(self) -> dict[str, float]:
        """Current lengthscale, outputscale and noise (standardised units), for logs and tests."""
        if self._model is None:
            return {}
        base = self._model.covar_module_base
        return {
            "lengthscale": float(base.base_kernel.lengthscale.item()),
            "outputscale": float(base.outputscale.item()),
            "noise": float(self._likelihood.noise.item()),
            "fitted_on": self._fitted_on,
        }


def _Model(x, y, likelihood, inducing):  # a factory: gpytorch is imported lazily
    import gpytorch

    class _GP(gpytorch.models.ExactGP):
        def __init__(self) -> None:
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module_base = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
            if inducing is None:
                self.covar_module = self.covar_module_base
            else:
                self.covar_module = gpytorch.kernels.InducingPointKernel(
                    self.covar_module_base, inducing_points=inducing, likelihood=likelihood
                )

        def forward(self, inputs):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(inputs), self.covar_module(inputs)
            )

    return _GP()
