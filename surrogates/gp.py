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

With ``background_refit`` a refit after the first runs in a thread while the master goes on ranking with
the previous hyperparameters (conditioned on every point as usual); the new ones are swapped in at the
first prediction after the fit ends. A refit at thousands of points takes tens of seconds, and on the
master of an MPI run that is tens of seconds in which no worker gets new work. The price is that when
the swap happens depends on timing, so decisions are no longer a pure function of the data; the
engine uses it only where they are not anyway (several workers finishing in any order).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_solve, solve_triangular
from sklearn.preprocessing import StandardScaler

# Adam steps per hyperparameter fit, and its learning rate on the (softplus-transformed) raw parameters.
TRAIN_ITERATIONS = 60
LEARNING_RATE = 0.1
# Observation noise floor (standardised units): keeps the Cholesky factorisation of near-duplicate
# descriptors stable.
NOISE_FLOOR = 1e-4
# Added to kernel diagonals before a Cholesky factorisation (standardised units).
JITTER = 1e-8

log = logging.getLogger("globopt.surrogate")


@dataclass(frozen=True)
class GPSettings:
    min_points: int = 10
    refit_every: int = 10
    refit_growth: float = 0.1
    sparse_above: int = 1000
    inducing_points: int = 200
    seed: int = 0
    background_refit: bool = False  # refits after the first run in a thread (see the module doc)


@dataclass
class GPTimings:
    """Seconds spent in the last fit/condition/predict: the engine reports them against relaxation time."""

    fit: float = 0.0
    condition: float = 0.0
    predict: float = 0.0
    fits: int = 0
    background_fits: int = 0  # of the fits, those run in the background thread


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _exact_solves():
    """Cholesky, never gpytorch's CG/Lanczos (its default above 800 points): exact and deterministic, and
    the exact GP is only used up to ``sparse_above`` points, where a Cholesky factorisation is cheap."""
    import gpytorch

    return gpytorch.settings.max_cholesky_size(10**6)


def fit_sizes(settings: GPSettings, n: int) -> int:
    """Number of leading points the hyperparameters are fitted on when ``n`` points are known (0: none)."""
    size = settings.min_points
    if n < size:
        return 0
    while (following := next_fit_size(settings, size)) <= n:
        size = following
    return size


def next_fit_size(settings: GPSettings, size: int) -> int:
    """The number of points the fit after one on ``size`` points is made at."""
    return max(size + settings.refit_every, int(np.ceil(size * (1 + settings.refit_growth))))


class GPSurrogate:
    """Predicts relaxed enthalpy per atom (mean and standard deviation, eV/atom) from descriptors."""

    def __init__(self, settings: GPSettings | None = None) -> None:
        self.settings = settings or GPSettings()
        self._x: list[np.ndarray] = []
        self._y: list[float] = []
        self._fitted_on = 0  # leading points the current hyperparameters were fitted on
        self._conditioned_on = 0  # points the current posterior has seen
        self._model = None  # gpytorch model of the last fit (hyperparameters live here)
        self._likelihood = None
        self._posterior: _Posterior | None = None
        self._x_scaler: StandardScaler | None = None
        self._y_scaler: StandardScaler | None = None
        self.timings = GPTimings()
        self._refit_thread: threading.Thread | None = None
        self._refit_result: _Fit | None = None  # set by the refit thread when it is done
        self._refit_size = 0  # points the running (or last) background fit was started on
        self._refit_error: BaseException | None = None  # set by the refit thread when its fit raised
        self._background = self.settings.background_refit  # off after a failed background fit
        self._failed_size = 0  # the fit size whose fit (in the master's thread) raised: not tried again

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
        """Enough points, and a model to predict with (none while the only fit tried so far failed)."""
        n = len(self._y)
        if n < self.settings.min_points:
            return False
        return self._posterior is not None or fit_sizes(self.settings, n) != self._failed_size

    @property
    def sparse(self) -> bool:
        return self._fitted_on > self.settings.sparse_above

    # -- model -----------------------------------------------------------------------------------
    def predict(self, descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation (including observation noise) of the relaxed enthalpy."""
        if not self.ready:
            raise RuntimeError(f"the GP needs {self.settings.min_points} points, has {len(self._y)}")
        self._update()
        if self._posterior is None:  # the first fit failed (logged): the data's mean and spread, this once
            y = np.asarray(self._y)
            count = len(np.atleast_2d(descriptors))
            return np.full(count, y.mean()), np.full(count, y.std())
        started = time.perf_counter()
        x = self._x_scaler.transform(np.atleast_2d(descriptors))
        mean, variance = self._posterior.predict(x)
        scale = float(self._y_scaler.scale_[0])
        self.timings.predict = time.perf_counter() - started
        return mean * scale + float(self._y_scaler.mean_[0]), np.sqrt(np.maximum(variance, 0)) * scale

    def _update(self) -> None:
        n = len(self._y)
        target = fit_sizes(self.settings, n)
        if self._background and self._posterior is not None:
            self._refit_in_background(target)  # turns self._background off if the thread's fit failed
        if (not self._background or self._posterior is None) and target not in (
            self._fitted_on,
            self._failed_size,
        ):
            self._fit_here(target)
        if self._posterior is not None and self._conditioned_on != n:
            started = time.perf_counter()
            # one point at a time, in order: the same arithmetic whether the points arrive one per step
            # (running engine) or all at once (rebuilt on resume)
            x, y = self._scaled(self._conditioned_on, n)  # row-wise transform: batching changes nothing
            for row, target in zip(x, y, strict=True):
                self._posterior.append(row, target)
            self._conditioned_on = n
            self.timings.condition = time.perf_counter() - started

    def _fit_here(self, target: int) -> None:
        """Fit in the caller's thread; a failure is logged and leaves the previous model in place."""
        try:
            with _one_torch_thread():
                fit = self._train(target)
        except Exception as error:  # whatever broke the fit, the run goes on without it
            self._failed_size = target
            keeps = (
                f"ranking goes on with the hyperparameters fitted on {self._fitted_on} points"
                if self._posterior is not None
                else "proposals are relaxed unranked until then"
            )
            log.warning(
                "GP hyperparameter fit on %d points failed (%s: %s); %s; next fit at %d points",
                target, type(error).__name__, error, keeps, next_fit_size(self.settings, target),
            )  # fmt: skip
            return
        self._install(fit)

    def _refit_in_background(self, target: int) -> None:
        """Install a finished background fit, or start one on the first ``target`` points."""
        if self._refit_thread is not None and not self._refit_thread.is_alive():
            self._refit_thread.join()
            self._refit_thread = None
            result, self._refit_result = self._refit_result, None
            error, self._refit_error = self._refit_error, None
            if result is not None:
                self._install(result)
                self.timings.background_fits += 1
            elif error is not None:
                self._background = False  # _update retries in the master's thread, where it is logged
                log.warning(
                    "GP hyperparameter fit on %d points failed in the background thread (%s: %s); "
                    "it and later refits run in the master's thread",
                    self._refit_size, type(error).__name__, error,
                )  # fmt: skip
                return
        if self._refit_thread is None and target != self._fitted_on:
            x, y = list(self._x[:target]), list(self._y[:target])  # the thread sees a fixed copy
            self._refit_size = target

            def fit() -> None:
                try:
                    with _one_torch_thread():
                        self._refit_result = self._train(target, x, y)
                except Exception as error:  # handed to the master's thread, which logs it
                    self._refit_error = error

            self._refit_thread = threading.Thread(target=fit, name="gp-refit", daemon=True)
            self._refit_thread.start()

    def wait_for_refit(self) -> None:
        """Block until a background refit has finished (tests, and the end of a benchmark)."""
        if self._refit_thread is not None:
            self._refit_thread.join()

    def _scaled(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        x = self._x_scaler.transform(np.vstack(self._x[start:stop]))
        y = self._y_scaler.transform(np.asarray(self._y[start:stop])[:, None])[:, 0]
        return x, y

    def _train(self, size: int, xs: list | None = None, ys: list | None = None) -> _Fit:
        """Fit hyperparameters on the first ``size`` points (of ``xs``/``ys``, default the data); touches
        no state of the surrogate, so it may run in a thread."""
        import gpytorch
        import torch

        started = time.perf_counter()
        xs = self._x[:size] if xs is None else xs
        ys = self._y[:size] if ys is None else ys
        x_scaler = StandardScaler().fit(np.vstack(xs))
        y_scaler = StandardScaler().fit(np.asarray(ys)[:, None])
        x_np = x_scaler.transform(np.vstack(xs))
        y_np = y_scaler.transform(np.asarray(ys)[:, None])[:, 0]
        x, y = torch.as_tensor(x_np), torch.as_tensor(y_np)
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
        with _exact_solves():
            for _ in range(TRAIN_ITERATIONS):
                optimizer.zero_grad()
                loss = -mll(model(x), y)
                loss.backward()
                optimizer.step()
        base = model.covar_module_base
        posterior = _Posterior(
            lengthscale=float(base.base_kernel.lengthscale.item()),
            outputscale=float(base.outputscale.item()),
            noise=float(likelihood.noise.item()),
            mean=float(model.mean_module.constant.item()),
            inducing=None if inducing is None else model.covar_module.inducing_points.detach().numpy().copy(),
        )
        posterior.reset(x_np, y_np)
        return _Fit(size, model, likelihood, posterior, x_scaler, y_scaler, time.perf_counter() - started)

    def _install(self, fit: _Fit) -> None:
        self._model, self._likelihood, self._posterior = fit.model, fit.likelihood, fit.posterior
        self._x_scaler, self._y_scaler = fit.x_scaler, fit.y_scaler
        self._fitted_on = self._conditioned_on = fit.size
        self.timings.fit = fit.seconds
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


@dataclass
class _Fit:
    """A hyperparameter fit and the posterior on the points it was fitted on."""

    size: int
    model: object
    likelihood: object
    posterior: _Posterior
    x_scaler: StandardScaler
    y_scaler: StandardScaler
    seconds: float


class _Posterior:
    """Closed-form GP posterior for fixed hyperparameters (standardised units), grown one point at a time.

    gpytorch fits the hyperparameters; between refits this class conditions on new points at O(n^2)
    (exact: the Cholesky factor is extended by one row) or O(m^2) (sparse: the m x m system of the SGPR/DTC
    predictive equations gets a rank-one update), instead of refactorising from scratch every step.
    tests/test_surrogate.py checks it against gpytorch's own posterior: the exact one equals gpytorch's;
    the sparse one is Titsias' SGPR predictive (gpytorch's mean without its diagonal correction, and a
    variance that keeps the Nystrom gap k** - Q** at the test point).
    """

    def __init__(
        self, lengthscale: float, outputscale: float, noise: float, mean: float, inducing: np.ndarray | None
    ) -> None:
        self.lengthscale, self.outputscale, self.noise, self.mean = lengthscale, outputscale, noise, mean
        self.inducing = inducing
        self._alpha: np.ndarray | None = None  # cached weights, invalidated by new data

    def kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return self.outputscale * np.exp(-0.5 * np.maximum(squared, 0.0) / self.lengthscale**2)

    def reset(self, x: np.ndarray, y: np.ndarray) -> None:
        residual = y - self.mean
        if self.inducing is None:
            self.x = x.copy()
            self.residual = residual.copy()
            covariance = self.kernel(x, x) + (self.noise + JITTER) * np.eye(len(x))
            self.chol = np.linalg.cholesky(covariance)
        else:
            z = self.inducing
            self.chol_mm = np.linalg.cholesky(self.kernel(z, z) + JITTER * np.eye(len(z)))
            k_mn = self.kernel(z, x)
            self.a = self.noise * (self.chol_mm @ self.chol_mm.T) + k_mn @ k_mn.T
            self.b = k_mn @ residual
        self._alpha = None

    def append(self, x: np.ndarray, y: float) -> None:
        residual = y - self.mean
        if self.inducing is None:
            k = self.kernel(self.x, x[None, :])[:, 0]
            row = solve_triangular(self.chol, k, lower=True)
            diagonal = np.sqrt(max(self.outputscale + self.noise + JITTER - row @ row, JITTER))
            n = len(self.x)
            grown = np.zeros((n + 1, n + 1))
            grown[:n, :n] = self.chol
            grown[n, :n] = row
            grown[n, n] = diagonal
            self.chol = grown
            self.x = np.vstack([self.x, x])
            self.residual = np.append(self.residual, residual)
        else:
            k = self.kernel(self.inducing, x[None, :])[:, 0]
            self.a += np.outer(k, k)
            self.b += k * residual
        self._alpha = None

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of a new observation (latent variance + noise)."""
        if self.inducing is None:
            if self._alpha is None:
                self._alpha = cho_solve((self.chol, True), self.residual)
            k = self.kernel(x, self.x)
            v = solve_triangular(self.chol, k.T, lower=True)
            latent = self.outputscale - (v * v).sum(0)
            return self.mean + k @ self._alpha, latent + self.noise
        if self._alpha is None:
            self._chol_a = np.linalg.cholesky(self.a)
            self._alpha = cho_solve((self._chol_a, True), self.b)
        k = self.kernel(self.inducing, x)
        v_mm = solve_triangular(self.chol_mm, k, lower=True)
        v_a = solve_triangular(self._chol_a, k, lower=True)
        latent = self.outputscale - (v_mm * v_mm).sum(0) + self.noise * (v_a * v_a).sum(0)
        return self.mean + k.T @ self._alpha, latent + self.noise


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
