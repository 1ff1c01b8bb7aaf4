"""A drop-in ``FrechetCellFilter`` whose 3x3 matrix functions cost microseconds instead of milliseconds.

Why this exists: ASE's ``FrechetCellFilter`` calls ``scipy.linalg.logm`` on the 3x3 deformation gradient in
both ``get_positions`` and ``get_forces`` (about 2.5 ms each: scipy's general inverse-scaling-and-squaring
algorithm has large constant overhead) and ``scipy.linalg.expm_frechet`` nine times per ``get_forces``
(about 0.25 ms each). For the small cells that dominate crystal-structure search that is ~8 ms of pure
overhead per optimiser step, comparable to the interatomic potential itself.

For a diagonalisable 3x3 matrix ``F = V diag(mu) V^-1`` both quantities have exact closed forms:

* ``logm(F) = V diag(log mu) V^-1`` (principal branch; complex eigenpairs of a real matrix come in
  conjugate pairs, so the result is real up to rounding and we keep the real part);
* the Frechet derivative of ``expm`` at ``A = logm(F)`` (Daleckii-Krein):
  ``L(A, E) = V [G o (V^-1 E V)] V^-1`` with ``G_ij = (e^li - e^lj) / (li - lj)``, ``l = log mu``.

ASE contracts the nine derivatives ``L(A, E_mn)`` with the UnitCellFilter cell gradient ``C``. Because the
adjoint of ``L(A, .)`` under the Frobenius product is ``L(A^T, .)``, the nine contractions are the single
matrix ``L(A^T, C)``; we evaluate that one matrix instead of nine.

The eigen route loses roughly ``cond(V) * eps`` of accuracy, so whenever the eigenvector matrix is
ill-conditioned (defective or nearly defective ``F``, e.g. an exact simple shear), has an eigenvalue on the
closed negative real axis, or is not finite, we fall back to scipy (``logm`` plus one adjoint
``expm_frechet``), which is what ASE computes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from ase.filters import FrechetCellFilter
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress
from numpy.typing import NDArray
from scipy.linalg import expm_frechet, logm

__all__ = ["EIGEN_COND_LIMIT", "FastFrechetCellFilter", "expm_frechet_log_pullback", "logm_3x3"]

FloatArray = NDArray[np.float64]

# Upper limit on ||V||_F ||V^-1||_F (an upper bound on the 2-norm condition number, within a factor of 3)
# for which the eigen formulas are trusted. Their extra error is about cond * 1e-16, so 1e3 keeps results
# within ~1e-13 of scipy relative to the matrix norm, while random matrices and the deformation gradients
# met in relaxations (cond ~ 3-60) stay on the fast path; exact and near-exact shears fall back.
EIGEN_COND_LIMIT = 1.0e3


class _Eigen(NamedTuple):
    """Eigendecomposition ``F = vecs @ diag(values) @ vecs_inv`` (complex or real dtype)."""

    values: NDArray[np.complexfloating] | FloatArray
    vecs: NDArray[np.complexfloating] | FloatArray
    vecs_inv: NDArray[np.complexfloating] | FloatArray


def _decompose(matrix: FloatArray) -> _Eigen | None:
    """Eigendecompose ``matrix`` or return None when the closed forms would not be accurate.

    None means: not finite, an eigenvalue with non-positive real part (the principal log is then not the
    real matrix ASE expects, or the matrix is singular), or an ill-conditioned eigenvector matrix
    (defective or nearly defective input, where eigenvector-based formulas lose accuracy).
    """
    if not np.all(np.isfinite(matrix)):
        return None
    try:
        values, vecs = np.linalg.eig(matrix)
        vecs_inv = np.linalg.inv(vecs)
    except np.linalg.LinAlgError:
        return None
    if not np.all(np.isfinite(vecs_inv)) or np.any(values.real <= 0.0):
        return None
    # Frobenius norms: cheaper than np.linalg.cond's SVD and never below the 2-norm condition number.
    if np.linalg.norm(vecs) * np.linalg.norm(vecs_inv) > EIGEN_COND_LIMIT:
        return None
    return _Eigen(values, vecs, vecs_inv)


def _logm_from_eigen(eigen: _Eigen, scale: float = 1.0) -> FloatArray:
    """``logm(scale * F)`` from the decomposition of ``F`` (the real part: the exact result is real)."""
    log_values = np.log(scale * eigen.values)
    return np.ascontiguousarray(((eigen.vecs * log_values) @ eigen.vecs_inv).real)


def _exp_divided_differences(eigen: _Eigen) -> NDArray[np.complexfloating] | FloatArray:
    """``G_ij = (e^li - e^lj) / (li - lj)`` at ``l = log(values)``, ``e^li`` on the diagonal/coincidences.

    Written as ``e^lj * expm1(d) / d`` with ``d = li - lj`` so nearly equal eigenvalues (the usual case:
    deformation gradients are close to the identity) do not suffer cancellation; ``e^lj`` is the eigenvalue
    of ``F`` itself, so no exponential is recomputed.
    """
    log_values = np.log(eigen.values)
    diff = log_values[:, None] - log_values[None, :]
    zero = diff == 0
    safe = np.where(zero, 1.0, diff)
    phi = np.where(zero, 1.0, np.expm1(safe) / safe)
    return eigen.values[None, :] * phi


def _pullback_from_eigen(eigen: _Eigen, weight: FloatArray) -> FloatArray:
    """``L(A^T, weight)`` with ``A = logm(F)``: all nine contractions ``<L(A, E_mn), weight>`` at once.

    With ``A = V diag(l) V^-1`` one has ``A^T = W diag(l) W^-1`` for ``W = V^-T``, so the Daleckii-Krein
    formula becomes ``W [G o (V^T weight W)] V^T``.
    """
    w = eigen.vecs_inv.T
    vt = eigen.vecs.T
    g = _exp_divided_differences(eigen)
    return np.ascontiguousarray((w @ (g * (vt @ weight @ w)) @ vt).real)


def _logm_scipy(matrix: FloatArray) -> FloatArray:
    """scipy's ``logm``, exactly as ASE calls it (kept as the reference and the fallback)."""
    return np.asarray(logm(matrix))


def logm_3x3(matrix: FloatArray, scale: float = 1.0) -> FloatArray:
    """Principal matrix logarithm of ``scale * matrix`` for a real 3x3 matrix, scipy where ill-conditioned.

    ``scale`` exists because ASE's Frechet filter takes the log of ``natoms * F``; passing the scale lets
    the decomposition of ``F`` be reused for it.
    """
    matrix = np.asarray(matrix, dtype=float)
    eigen = _decompose(matrix)
    if eigen is None:
        return _logm_scipy(scale * matrix)
    return _logm_from_eigen(eigen, scale)


def expm_frechet_log_pullback(matrix: FloatArray, weight: FloatArray) -> FloatArray:
    """Matrix ``M`` with ``M[m, n] = sum(expm_frechet(logm(matrix), E_mn) * weight)`` for a real 3x3 matrix.

    This is the gradient of a function of the cell with respect to the log of the deformation gradient,
    the quantity ASE's ``FrechetCellFilter.get_forces`` builds from nine ``expm_frechet`` calls.
    """
    matrix = np.asarray(matrix, dtype=float)
    weight = np.asarray(weight, dtype=float)
    eigen = _decompose(matrix)
    if eigen is None:
        return _pullback_scipy(matrix, weight)
    return _pullback_from_eigen(eigen, weight)


def _pullback_scipy(matrix: FloatArray, weight: FloatArray) -> FloatArray:
    """Fallback: one adjoint ``expm_frechet`` (equal to ASE's nine calls; real part as ASE stores it)."""
    log_matrix = _logm_scipy(matrix)
    derivative = expm_frechet(log_matrix.T, weight, compute_expm=False)
    return np.ascontiguousarray(np.real(derivative), dtype=float)


class FastFrechetCellFilter(FrechetCellFilter):
    """``FrechetCellFilter`` with closed-form 3x3 ``logm`` and Frechet derivatives; same DOFs and forces.

    Constructor, degrees of freedom (including ASE's ``log(natoms) * I`` offset in the cell block),
    ``scalar_pressure``, ``hydrostatic_strain``, ``constant_volume``, ``mask``, ``exp_cell_factor`` and the
    ``stress`` attribute used for convergence checks are those of the parent; only ``get_positions`` and
    ``get_forces`` are re-expressed so that their matrix functions use the eigen formulas above (scipy on
    ill-conditioned input). ``set_positions`` is inherited: its one ``expm`` is already cheap in scipy.
    The eigendecomposition is cached per deformation gradient because an optimiser step asks for forces
    and positions at the same cell.
    """

    _eigen_key: bytes | None = None
    _eigen_cached: _Eigen | None = None

    def _eigen(self, deform_grad: FloatArray) -> _Eigen | None:
        """Decomposition of the current deformation gradient, reused while the cell is unchanged."""
        key = deform_grad.tobytes()
        if key != self._eigen_key:
            self._eigen_cached = _decompose(deform_grad)
            self._eigen_key = key
        return self._eigen_cached

    def get_positions(self) -> FloatArray:
        """Scaled positions in the reference cell plus ``exp_cell_factor * logm(natoms * F)``, as ASE does."""
        positions = self.atoms.get_positions()
        natoms = len(positions)
        deform_grad = self.deform_grad()
        pos = np.zeros((natoms + 3, 3))
        pos[:natoms] = np.linalg.solve(deform_grad, positions.T).T
        # ASE takes the log of the UnitCellFilter cell block, natoms * F (its cell_factor default); keep
        # that so positions are interchangeable with FrechetCellFilter and consistent with set_positions.
        eigen = self._eigen(deform_grad)
        if eigen is None:
            log_block = _logm_scipy(float(natoms) * deform_grad)
        else:
            log_block = _logm_from_eigen(eigen, float(natoms))
        pos[natoms:] = log_block * self.exp_cell_factor
        return pos

    def get_forces(self, **kwargs: object) -> FloatArray:
        """Atomic forces in the reference frame plus the gradient w.r.t. ``log F`` (ASE's definitions)."""
        stress = self.atoms.get_stress(**kwargs)
        atoms_forces = self.atoms.get_forces(**kwargs)
        cell = self.atoms.get_cell()
        volume = cell.volume

        virial = -volume * (voigt_6_to_full_3x3_stress(stress) + np.diag([self.scalar_pressure] * 3))
        deform_grad = self.deform_grad()
        if self.hydrostatic_strain:
            vtr = virial.trace()
            virial = np.diag([vtr / 3.0, vtr / 3.0, vtr / 3.0])
        mask = np.asarray(self.mask)
        if (mask != 1.0).any():
            virial *= mask

        # Gradient w.r.t. F (UnitCellFilter), then pulled back through F = expm(A) to A = logm(F).
        ucf_cell_grad = virial @ np.linalg.inv(deform_grad.T)
        eigen = self._eigen(deform_grad)
        if eigen is None:
            log_force = _pullback_scipy(deform_grad, ucf_cell_grad)
        else:
            log_force = _pullback_from_eigen(eigen, ucf_cell_grad)

        convergence_crit_stress = -(virial / volume)
        if self.constant_volume:
            np.fill_diagonal(log_force, np.diag(log_force) - log_force.trace() / 3.0)
            ccs_trace = convergence_crit_stress.trace()
            np.fill_diagonal(convergence_crit_stress, np.diag(convergence_crit_stress) - ccs_trace / 3.0)

        natoms = len(atoms_forces)
        forces = np.zeros((natoms + 3, 3))
        forces[:natoms] = atoms_forces @ deform_grad
        forces[natoms:] = log_force / self.exp_cell_factor
        self.stress = full_3x3_to_voigt_6_stress(convergence_crit_stress)
        return forces
