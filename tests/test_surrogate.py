"""GP surrogate: descriptors, regression quality on real (EMT) energies, LCB screening in the engine,
skipped / stopped_early bookkeeping, and resume rebuilding the surrogate from the archive."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from helpers import emt_config, read_results
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor

from globopt.candidate import RelaxTask, Status
from globopt.cli import main
from globopt.config import ConfigError, PotentialConfig, parse_config
from globopt.duplicates import reduced_for_matching
from globopt.evaluator.early_stop import EarlyStopper, EarlyStopSettings, projected_final
from globopt.evaluator.evaluate import EvaluatorSettings, evaluate
from globopt.evaluator.known_minima import KnownMinimaSettings, KnownMinimum
from globopt.evaluator.relax import RelaxSettings
from globopt.structure_codec import structure_to_json
from surrogates.acquisition import expected_improvement, learned_points, lower_confidence_bound
from surrogates.descriptors import DESCRIPTORS, M3GNET_ENERGY_WEIGHT, PairRDFDescriptor, make_descriptor
from surrogates.gp import GPSettings, GPSurrogate, fit_sizes

GA = {"population_size": 6, "initial_random": 6}
SURROGATE = {"enabled": True, "min_points": 5, "candidates_per_slot": 3}
BUDGET = 10  # relaxations of the engine runs: 5 before the GP ranks, 5 ranked
DESCRIBE = PairRDFDescriptor(("Cu", "Au"))
EMT_POTENTIAL = PotentialConfig(kind="emt").model_dump()


def random_cuau(rng: np.random.Generator) -> Structure:
    """A Cu2Au2 cell: fcc sites with random species order, strain and displacements (no pair below 2.1 Å)."""
    sites = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    while True:
        strain = np.eye(3) + rng.normal(0, 0.08, (3, 3))
        lattice = Lattice(3.9 * strain)
        species = list(rng.permutation(["Cu", "Cu", "Au", "Au"]))
        structure = Structure(lattice, species, sites + rng.normal(0, 0.07, (4, 3)))
        if structure.distance_matrix[np.triu_indices(4, 1)].min() > 2.1:
            return structure


def emt_energy_per_atom(structure: Structure) -> float:
    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = EMT()
    return atoms.get_potential_energy() / len(atoms)


@pytest.fixture(scope="module")
def cuau_data() -> tuple[np.ndarray, np.ndarray, list[Structure]]:
    rng = np.random.default_rng(0)
    structures = [random_cuau(rng) for _ in range(130)]
    energies = np.array([emt_energy_per_atom(s) for s in structures])
    return DESCRIBE.many(structures), energies, structures


# -- descriptors ------------------------------------------------------------------------------------------
def test_descriptor_is_invariant_to_supercell_permutation_and_rotation() -> None:
    structure = random_cuau(np.random.default_rng(1))
    reference = DESCRIBE(structure)
    assert reference.shape == (DESCRIBE.size,) and np.all(np.isfinite(reference))
    assert np.allclose(DESCRIBE(structure * (2, 1, 1)), reference, atol=1e-8)
    permuted = Structure.from_sites([structure[i] for i in (3, 1, 2, 0)])
    assert np.allclose(DESCRIBE(permuted), reference, atol=1e-8)
    rotated = structure.copy()
    rotated.apply_operation(_rotation_about_z(0.7))
    assert np.allclose(DESCRIBE(rotated), reference, atol=1e-8)
    swapped = structure.copy()
    swapped.replace_species({"Cu": "Au", "Au": "Cu"})
    assert not np.allclose(DESCRIBE(swapped), reference), "the descriptor must see which element is where"


def _rotation_about_z(angle: float):
    from pymatgen.core.operations import SymmOp

    return SymmOp.from_axis_angle_and_translation((0, 0, 1), angle, angle_in_radians=True)


def test_descriptor_rejects_foreign_elements() -> None:
    nacl = Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match="not among the descriptor elements"):
        DESCRIBE(nacl)


# -- M3GNet descriptors (real model from ../shared/models) ------------------------------------------------
def test_m3gnet_descriptor_is_invariant_and_carries_the_single_point_energy(models_dir: Path) -> None:
    from globopt.structure_codec import structure_from_json, structure_to_json
    from surrogates.m3gnet import make_calculator

    describe = make_descriptor("m3gnet", ["O", "Ti"])
    structure = random_tio2(np.random.default_rng(2))
    reference = describe(structure)
    # one 64-wide block of mean final atom features per element (O, then Ti), then the energy column(s)
    assert reference.shape == (describe.size,) == (2 * 64 + M3GNET_ENERGY_WEIGHT,)
    assert np.all(np.isfinite(reference))
    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = make_calculator()
    assert reference[-1] == pytest.approx(atoms.get_potential_energy() / len(atoms), abs=1e-4)
    assert np.allclose(describe(structure * (1, 2, 1)), reference, atol=1e-4)
    permuted = Structure.from_sites([structure[i] for i in (5, 3, 1, 2, 0, 4)])
    assert np.allclose(describe(permuted), reference, atol=1e-4)
    rotated = structure.copy()
    rotated.apply_operation(_rotation_about_z(1.1))
    assert np.allclose(describe(rotated), reference, atol=1e-4)
    # the GP rebuilt on resume reads initial structures back from the archive: same vector
    assert np.array_equal(describe(structure_from_json(structure_to_json(structure))), reference)
    moved = structure.copy()
    moved.translate_sites([0], [0.1, 0.0, 0.0])
    assert not np.allclose(describe(moved), reference, atol=1e-3)
    # the variants: embedding alone, energy alone
    embedding, energy = (
        make_descriptor("m3gnet_embedding", ["O", "Ti"]),
        make_descriptor("m3gnet_energy", ["Ti", "O"]),
    )
    assert np.array_equal(embedding(structure), reference[:128])
    assert energy(structure).tolist() == [reference[-1]]


def test_m3gnet_descriptor_sees_composition_and_rejects_foreign_elements(models_dir: Path) -> None:
    describe = make_descriptor("m3gnet_embedding", ["Cu", "Au"])
    structure = random_cuau(np.random.default_rng(4))
    swapped = structure.copy()
    swapped.replace_species({"Cu": "Au", "Au": "Cu"})
    assert not np.allclose(describe(swapped), describe(structure), atol=1e-3)
    nacl = Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match="not among the descriptor elements"):
        describe(nacl)


def random_tio2(rng: np.random.Generator) -> Structure:
    """Rutile with a random strain and displacements (an unrelaxed proposal-like Ti2O4 cell)."""
    rutile = Structure.from_spacegroup(
        "P4_2/mnm", Lattice.tetragonal(4.59, 2.96), ["Ti", "O"], [[0, 0, 0], [0.305, 0.305, 0]]
    )
    strain = np.eye(3) + rng.normal(0, 0.05, (3, 3))
    return Structure(
        Lattice(rutile.lattice.matrix @ strain),
        rutile.species,
        rutile.cart_coords @ strain + rng.normal(0, 0.1, (6, 3)),
        coords_are_cartesian=True,
    )


@pytest.mark.parametrize("name", DESCRIPTORS)
def test_config_accepts_every_descriptor(name: str) -> None:
    base = {"name": "x", "composition": "Cu2Au2", "potential": {"kind": "emt"}}
    assert parse_config({**base, "surrogate": {"descriptor": name}}).surrogate.descriptor == name
    with pytest.raises(ConfigError, match=r"surrogate\.descriptor"):
        parse_config({**base, "surrogate": {"descriptor": "soap"}})


# -- GP ---------------------------------------------------------------------------------------------------
def test_gp_beats_the_mean_on_real_energies_and_sigma_is_calibrated(cuau_data) -> None:
    x, y, _ = cuau_data
    gp = GPSurrogate(GPSettings(min_points=10))
    for row, energy in zip(x[:100], y[:100], strict=True):
        gp.add(row, energy)
    mu, sigma = gp.predict(x[100:])
    mae = np.abs(mu - y[100:]).mean()
    baseline = np.abs(y[:100].mean() - y[100:]).mean()
    assert mae < 0.4 * baseline, f"GP MAE {mae:.3f} vs predicting the mean {baseline:.3f} eV/atom"
    within_2_sigma = np.mean(np.abs(mu - y[100:]) <= 2 * sigma)
    assert within_2_sigma >= 0.75, f"only {within_2_sigma:.0%} of held-out errors within 2 sigma"


def test_sigma_grows_away_from_the_data(cuau_data) -> None:
    x, y, structures = cuau_data
    gp = GPSurrogate(GPSettings(min_points=10))
    for row, energy in zip(x[:80], y[:80], strict=True):
        gp.add(row, energy)
    _, sigma_seen = gp.predict(x[:5])
    far = structures[0].copy()
    far.scale_lattice(far.volume * 3.0)  # a dilute gas of the same atoms: nothing like the training set
    _, sigma_far = gp.predict(DESCRIBE(far)[None, :])
    assert sigma_far[0] > 3 * sigma_seen.max()


def test_sparse_gp_agrees_with_exact_gp_on_small_data(cuau_data) -> None:
    x, y, _ = cuau_data
    exact = GPSurrogate(GPSettings(min_points=10, sparse_above=1000))
    sparse = GPSurrogate(GPSettings(min_points=10, sparse_above=20, inducing_points=60))
    for row, energy in zip(x[:100], y[:100], strict=True):
        exact.add(row, energy)
        sparse.add(row, energy)
    mu_exact, _ = exact.predict(x[100:])
    mu_sparse, sigma_sparse = sparse.predict(x[100:])
    assert sparse.sparse and not exact.sparse
    baseline = np.abs(y[:100].mean() - y[100:]).mean()
    assert np.abs(mu_sparse - mu_exact).mean() < 0.35 * baseline
    assert np.abs(mu_sparse - y[100:]).mean() < 0.5 * baseline
    assert np.all(sigma_sparse > 0)


@pytest.mark.parametrize("sparse_above", [1000, 40], ids=["exact", "sparse"])
def test_closed_form_posterior_equals_gpytorchs(cuau_data, sparse_above: int) -> None:
    """The posterior grown one point at a time in gp.py against gpytorch's own, same hyperparameters.

    Exact GP: gpytorch's predictive mean and variance. Sparse GP: gp.py uses Titsias' SGPR predictive (as
    GPflow's SGPR does); its mean is gpytorch's with sgpr_diagonal_correction off, and its variance adds the
    Nystrom gap k** - Q** at the test points, which gpytorch's projected variance leaves out.
    """
    import gpytorch
    import torch

    from surrogates.gp import _exact_solves

    x, y, _ = cuau_data
    gp = GPSurrogate(GPSettings(min_points=10, sparse_above=sparse_above, inducing_points=25))
    for row, energy in zip(x[:90], y[:90], strict=True):
        gp.add(row, energy)
    gp.predict(x[:1])  # fit on the scheduled size, then condition on the rest one point at a time
    for row, energy in zip(x[90:95], y[90:95], strict=True):
        gp.add(row, energy)
    mu, sigma = gp.predict(x[100:])
    assert gp.sparse == (sparse_above == 40) and gp._fitted_on == 90 and len(gp) == 95

    model, likelihood = gp._model, gp._likelihood
    train_x = torch.as_tensor(gp._x_scaler.transform(np.vstack(gp._x)))
    train_y = torch.as_tensor(gp._y_scaler.transform(np.asarray(gp._y)[:, None])[:, 0])
    test_x = torch.as_tensor(gp._x_scaler.transform(x[100:]))
    model.set_train_data(train_x, train_y, strict=False)
    model.eval()
    likelihood.eval()
    with (
        torch.no_grad(),
        _exact_solves(),
        gpytorch.settings.fast_pred_var(False),
        gpytorch.settings.sgpr_diagonal_correction(False),
    ):
        predicted = likelihood(model(test_x))
        variance = predicted.variance.numpy()
        if gp.sparse:
            full = model.covar_module_base(test_x, diag=True).numpy()
            projected = model.covar_module(test_x, diag=True).numpy()
            variance = variance + (full - projected)
    scale, offset = float(gp._y_scaler.scale_[0]), float(gp._y_scaler.mean_[0])
    np.testing.assert_allclose(mu, predicted.mean.numpy() * scale + offset, atol=1e-6)
    np.testing.assert_allclose(sigma, np.sqrt(variance) * scale, rtol=1e-5, atol=1e-7)


def test_background_refit_keeps_ranking_and_then_matches_the_foreground_fit(cuau_data) -> None:
    x, y, _ = cuau_data
    settings = GPSettings(min_points=10, refit_every=10, refit_growth=0.1)
    foreground = GPSurrogate(settings)
    background = GPSurrogate(GPSettings(**{**settings.__dict__, "background_refit": True}))
    for gp in (foreground, background):
        for row, energy in zip(x[:40], y[:40], strict=True):
            gp.add(row, energy)
        gp.predict(x[100:])  # first fit (always in the caller's thread) on 40 points
        for row, energy in zip(x[40:55], y[40:55], strict=True):
            gp.add(row, energy)
    assert fit_sizes(settings, 55) == 50
    foreground.predict(x[100:])
    mu_old, _ = background.predict(x[100:])  # answers at once, with the 40-point hyperparameters
    assert background.hyperparameters()["fitted_on"] == 40 and np.all(np.isfinite(mu_old))
    background.wait_for_refit()
    mu_new, sigma_new = background.predict(x[100:])  # the 50-point fit is swapped in
    assert background.hyperparameters()["fitted_on"] == 50 and background.timings.background_fits == 1
    mu_fg, sigma_fg = foreground.predict(x[100:])
    np.testing.assert_allclose(mu_new, mu_fg, rtol=0, atol=1e-9)
    np.testing.assert_allclose(sigma_new, sigma_fg, rtol=0, atol=1e-9)


def _failing_fits(monkeypatch, sizes: set[int]) -> list[int]:
    """Make the hyperparameter fits on these numbers of points raise, as a broken factorisation would;
    returns the sizes every fit was tried on."""
    tried: list[int] = []
    train = GPSurrogate._train

    def train_or_fail(self, size, xs=None, ys=None):
        tried.append(size)
        if size in sizes:
            raise RuntimeError(f"simulated failure of the fit on {size} points")
        return train(self, size, xs, ys)

    monkeypatch.setattr(GPSurrogate, "_train", train_or_fail)
    return tried


def test_a_failed_refit_keeps_the_previous_model_and_is_not_retried(cuau_data, monkeypatch, caplog) -> None:
    x, y, _ = cuau_data
    tried = _failing_fits(monkeypatch, {50})
    gp = GPSurrogate(GPSettings(min_points=10, refit_every=10, refit_growth=0.1))
    for row, energy in zip(x[:40], y[:40], strict=True):
        gp.add(row, energy)
    first, _ = gp.predict(x[100:])
    with caplog.at_level("WARNING", logger="globopt.surrogate"):
        for row, energy in zip(x[40:55], y[40:55], strict=True):
            gp.add(row, energy)
            mu, sigma = gp.predict(x[100:])  # one prediction per new point, as the engine does
    assert np.all(np.isfinite(mu)) and np.all(sigma > 0)
    assert gp.hyperparameters()["fitted_on"] == 40 and tried == [40, 50]  # 50 tried once, not per step
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "fit on 50 points failed" in messages[0] and "fitted on 40" in messages[0]
    assert "next fit at 60" in messages[0]
    for row, energy in zip(x[55:60], y[55:60], strict=True):
        gp.add(row, energy)
    gp.predict(x[100:])
    assert gp.hyperparameters()["fitted_on"] == 60 and not np.allclose(gp.predict(x[100:])[0], first)


def test_a_failed_first_fit_leaves_the_surrogate_not_ready_until_the_next_size(
    cuau_data, monkeypatch, caplog
) -> None:
    x, y, _ = cuau_data
    _failing_fits(monkeypatch, {10})
    gp = GPSurrogate(GPSettings(min_points=10, refit_every=10, refit_growth=0.1))
    for row, energy in zip(x[:10], y[:10], strict=True):
        gp.add(row, energy)
    assert gp.ready
    with caplog.at_level("WARNING", logger="globopt.surrogate"):
        mu, sigma = gp.predict(x[100:103])  # the fit fails: this once, the data's mean and spread
    np.testing.assert_allclose(mu, y[:10].mean())
    np.testing.assert_allclose(sigma, y[:10].std())
    assert "relaxed unranked" in caplog.records[0].getMessage()
    assert not gp.ready  # the engine relaxes proposals unranked, instead of failing the same fit per step
    for row, energy in zip(x[10:20], y[10:20], strict=True):
        gp.add(row, energy)
    assert gp.ready
    gp.predict(x[100:])
    assert gp.hyperparameters()["fitted_on"] == 20


def test_a_background_refit_that_fails_is_logged_once_and_redone_in_the_masters_thread(
    cuau_data, monkeypatch, caplog
) -> None:
    import threading

    x, y, _ = cuau_data
    tried: list[tuple[int, str]] = []
    train = GPSurrogate._train

    def fail_in_the_thread(self, size, xs=None, ys=None):
        where = threading.current_thread().name
        tried.append((size, where))
        if where == "gp-refit":
            raise RuntimeError("simulated failure in the refit thread")
        return train(self, size, xs, ys)

    monkeypatch.setattr(GPSurrogate, "_train", fail_in_the_thread)
    gp = GPSurrogate(GPSettings(min_points=10, refit_every=10, refit_growth=0.1, background_refit=True))
    for row, energy in zip(x[:40], y[:40], strict=True):
        gp.add(row, energy)
    gp.predict(x[100:])
    with caplog.at_level("WARNING", logger="globopt.surrogate"):
        for row, energy in zip(x[40:70], y[40:70], strict=True):
            gp.add(row, energy)
            gp.predict(x[100:])
            gp.wait_for_refit()
    main_thread = threading.main_thread().name
    assert tried == [(40, main_thread), (50, "gp-refit")] + [(n, main_thread) for n in (50, 60, 70)]
    assert gp.hyperparameters()["fitted_on"] == 70 and gp.timings.background_fits == 0
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "background thread" in messages[0] and "master's thread" in messages[0]


def test_refit_schedule_grows_geometrically() -> None:
    settings = GPSettings(min_points=10, refit_every=10, refit_growth=0.1)
    assert fit_sizes(settings, 9) == 0
    assert fit_sizes(settings, 10) == fit_sizes(settings, 19) == 10
    assert fit_sizes(settings, 20) == 20
    sizes = {fit_sizes(settings, n) for n in range(10, 5001)}
    assert len(sizes) < 60, "hyperparameters must not be refitted every few points at thousands of points"


# -- acquisition ------------------------------------------------------------------------------------------
def test_expected_improvement_is_the_mean_improvement_below_the_best() -> None:
    rng = np.random.default_rng(3)
    best = -4.5
    mu, sigma = np.array([-4.6, -4.5, -4.45, -4.2]), np.array([0.05, 0.02, 0.08, 0.1])
    samples = rng.normal(mu, sigma, (400_000, 4))
    monte_carlo = np.maximum(0.0, best - samples).mean(0)
    np.testing.assert_allclose(expected_improvement(mu, sigma, best), monte_carlo, atol=2e-4)
    # a confident copy of the best promises little, an uncertain proposal a bit above it more; LCB ranks
    # them the other way round
    mu, sigma = np.array([-4.50, -4.46]), np.array([0.005, 0.04])
    copy, unknown = expected_improvement(mu, sigma, best)
    assert unknown > 1.5 * copy
    lcb_copy, lcb_unknown = lower_confidence_bound(mu, sigma, kappa=1.0)
    assert lcb_copy < lcb_unknown


def test_only_relaxed_candidates_teach_the_surrogate() -> None:
    structure = Structure(Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]])
    initial = structure_to_json(structure)
    assert learned_points("relaxed", -3.7, initial) == [(initial, -3.7)]
    for status in ("stopped_early", "collapsed", "skipped", "duplicate", "unconverged"):
        assert learned_points(status, -3.7, initial) == []


# -- early stopping ---------------------------------------------------------------------------------------
def test_projection_extrapolates_a_geometric_decay() -> None:
    limit = -10.0
    energies = [limit + 5.0 * 0.8**k for k in range(40)]
    projected = projected_final(energies, window=5)
    assert projected < energies[-1]
    assert projected == pytest.approx(limit, abs=1e-6)
    # a stalled relaxation is projected at its lowest point, never above it
    assert projected_final([1.0, 0.5, 0.6, 0.6, 0.6], window=2) == 0.5


def test_no_stop_is_decided_before_the_projection_has_two_windows() -> None:
    # a 12-atom cell still falling 0.1 eV/atom per step at step 20, 1 eV/atom above best + margin: its
    # current enthalpy says hopeless, but it has far to fall (the TiO2-12 searches lost hits this way)
    falling = [12 * (-6.0 - 0.1 * step) for step in range(40)]
    stopper = EarlyStopper(EarlyStopSettings(margin=0.3, min_steps=20, window=10), -8.9, 12)
    assert not stopper.hopeless(falling[:20])  # 20 enthalpies: no two windows yet, so no decision
    assert not stopper.hopeless(falling[:21])  # projected 9 windows further: about -16 eV/atom
    assert stopper.projected_per_atom < -8.9
    stalled = falling[:21] + [falling[20]] * 10  # the same cell stuck at -8.0 for a window: hopeless now
    assert stopper.hopeless(stalled) and stopper.projected_per_atom == pytest.approx(-8.0)


def test_hopeless_relaxation_is_stopped_early_with_its_projected_energy() -> None:
    structure = random_cuau(np.random.default_rng(5))
    relax = RelaxSettings(fmax=0.01, max_steps=300)
    plain = evaluate(RelaxTask(1, structure), EvaluatorSettings(EMT_POTENTIAL, relax))
    assert plain.status in (Status.RELAXED, Status.UNCONVERGED)
    # the default warm-up (20 steps, windows of 10): FIRE accelerates at first, so earlier windows would
    # underestimate how far a relaxation still falls
    early = EarlyStopSettings(margin=0.05)
    # a best far below anything this cell can reach: the relaxation is hopeless from the start
    task = RelaxTask(1, structure, best_enthalpy_per_atom=plain.energy_per_atom - 1.0)
    stopped = evaluate(task, EvaluatorSettings(EMT_POTENTIAL, relax, early_stop=early))
    assert stopped.status is Status.STOPPED_EARLY
    assert stopped.status.used_potential
    assert stopped.enthalpy_per_atom is None, "a stopped relaxation must not compete for best"
    projected = stopped.extra["projected_enthalpy_per_atom"]
    assert math.isfinite(projected) and projected > task.best_enthalpy_per_atom + early.margin
    assert stopped.n_force_calls < plain.n_force_calls
    # a best it can beat lets the relaxation finish
    task = RelaxTask(1, structure, best_enthalpy_per_atom=plain.energy_per_atom + 0.01)
    finished = evaluate(task, EvaluatorSettings(EMT_POTENTIAL, relax, early_stop=early))
    assert finished.status is plain.status


def test_a_relaxation_falling_into_a_known_minimum_is_stopped_there() -> None:
    relax = RelaxSettings(fmax=0.01, max_steps=300)
    start = random_cuau(np.random.default_rng(5))
    minimum = evaluate(RelaxTask(1, start), EvaluatorSettings(EMT_POTENTIAL, relax))
    assert minimum.status is Status.RELAXED
    # a strained, rattled copy of the minimum: it relaxes straight back
    copy = minimum.relaxed.copy()
    copy.apply_strain(0.03)
    copy.perturb(0.1, min_distance=0.05, seed=2)
    plain = evaluate(RelaxTask(2, copy), EvaluatorSettings(EMT_POTENTIAL, relax))
    assert plain.status is Status.RELAXED
    assert abs(plain.enthalpy_per_atom - minimum.enthalpy_per_atom) < 1e-3
    known = KnownMinimum(1, minimum.enthalpy_per_atom, reduced_for_matching(minimum.relaxed))
    watch = KnownMinimaSettings(first_step=3, every=1, energy_window=0.05, max_force=1.0)
    settings = EvaluatorSettings(EMT_POTENTIAL, relax, known_minima=watch)
    stopped = evaluate(RelaxTask(2, copy, known_minima=(known,)), settings)
    assert stopped.status is Status.STOPPED_EARLY and "known minimum 1" in stopped.reason
    assert stopped.extra["known_minimum"] == 1
    assert stopped.extra["projected_enthalpy_per_atom"] == minimum.enthalpy_per_atom
    assert stopped.n_force_calls < plain.n_force_calls
    # the same energy but another geometry (a dilated copy does not match under ltol): relaxed to the end
    elsewhere = minimum.relaxed.copy()
    elsewhere.apply_strain([0.4, 0.0, 0.0])
    other = KnownMinimum(1, minimum.enthalpy_per_atom, reduced_for_matching(elsewhere))
    finished = evaluate(RelaxTask(2, copy, known_minima=(other,)), settings)
    assert finished.status is Status.RELAXED
    assert finished.n_force_calls == plain.n_force_calls


# -- engine -----------------------------------------------------------------------------------------------
def run_surrogate_ga(folder: Path, evaluations: int, out: Path, *flags: str, **surrogate) -> int:
    config = emt_config(
        folder, name="gp", evaluations=evaluations, mode="ga", ga=GA, surrogate={**SURROGATE, **surrogate}
    )
    return main(["run", str(config), "--out", str(out), *flags])


@pytest.fixture(scope="module")
def surrogate_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gp")
    assert run_surrogate_ga(folder, BUDGET, folder / "run") == 0
    return folder / "run"


def test_surrogate_ga_skips_proposals_without_spending_the_budget(surrogate_run: Path) -> None:
    rows = read_results(surrogate_run)
    statuses = [r["status"] for r in rows]
    used = [s for s in statuses if Status(s).used_potential]
    assert len(used) == BUDGET, "skipped proposals must not count against the budget"
    db = sqlite3.connect(surrogate_run / "archive.sqlite")
    try:
        # each relaxation the GP chose came out of a batch of candidates_per_slot proposals; the others
        # were skipped (a batch may come up short when proposals keep failing the screens)
        ranked = [
            status
            for status, extra in db.execute("SELECT status, extra FROM candidates")
            if Status(status).used_potential and extra and "surrogate" in json.loads(extra)
        ]
        assert len(ranked) >= 2, "the GP never ranked a batch"
        per_batch = SURROGATE["candidates_per_slot"] - 1
        assert per_batch * len(ranked) - 2 <= statuses.count("skipped") <= per_batch * len(ranked)
        skipped = db.execute("SELECT n_force_calls, extra, reason FROM candidates WHERE status='skipped'")
        for force_calls, extra, reason in skipped:
            assert not force_calls
            prediction = json.loads(extra)["surrogate"]
            assert prediction["sigma"] > 0 and prediction["lcb"] <= prediction["mu"]
            assert "ranked better" in reason
        # every relaxation issued once the GP had min_points relaxed candidates was chosen by it (one may
        # have been issued just before); how many that is depends on how many early ones stopped early
        relaxed = db.execute(
            "SELECT extra FROM candidates WHERE status='relaxed' ORDER BY finished_at, id"
        ).fetchall()
        after_ready = relaxed[SURROGATE["min_points"] :]
        chosen = [extra for (extra,) in after_ready if extra and "surrogate" in json.loads(extra)]
        assert after_ready and len(chosen) >= len(after_ready) - 1
    finally:
        db.close()


VARIANTS = {
    "lcb": {},
    "ei": {"acquisition": "ei"},
    # relaxations stopped at known minima do not teach the GP: start ranking after 3 relaxed structures
    "ei-known-minima": {"acquisition": "ei", "min_points": 3, "early_stop": {"known_minima": True}},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_rebuilds_the_surrogate_and_makes_the_same_decisions(
    tmp_path: Path, surrogate_run: Path, variant: str
) -> None:
    overrides = VARIANTS[variant]
    whole = surrogate_run
    if overrides:
        whole = tmp_path / "whole"
        assert run_surrogate_ga(tmp_path, BUDGET, whole, **overrides) == 0
    split = tmp_path / "split"
    assert run_surrogate_ga(tmp_path, 6, split, **overrides) == 0
    assert run_surrogate_ga(tmp_path, BUDGET, split, "--resume", **overrides) == 0

    def sequence(run: Path) -> list[tuple[str, str, str, str]]:
        return [(r["origin"], r["status"], r["energy_per_atom"], r["reason"]) for r in read_results(run)]

    assert sequence(split) == sequence(whole)
    if "acquisition" in overrides:
        reasons = [r["reason"] for r in read_results(whole) if r["status"] == "skipped"]
        assert reasons and all(reason.startswith("surrogate EI") for reason in reasons)
    if "early_stop" in overrides:
        assert any("known minimum" in r["reason"] for r in read_results(whole))


def test_surrogate_with_two_pool_workers_refits_in_the_background(tmp_path: Path) -> None:
    surrogate = {**SURROGATE, "min_points": 3, "refit_every": 2}  # several refits within a short run
    config = emt_config(
        tmp_path, name="gp-pool", evaluations=14, mode="ga", ga=GA, surrogate=surrogate, workers=2
    )
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    rows = read_results(tmp_path / "run")
    assert sum(Status(r["status"]).used_potential for r in rows) == 14
    assert any(r["status"] == "skipped" for r in rows), "the GP never ranked a batch"


def test_surrogate_config_errors_name_the_key() -> None:
    base = {"name": "x", "composition": "Cu2Au2", "potential": {"kind": "emt"}}
    with pytest.raises(ConfigError, match=r"surrogate\.candidates_per_slot"):
        parse_config({**base, "surrogate": {"candidates_per_slot": 0}})
    with pytest.raises(ConfigError, match=r"surrogate\.kappa"):
        parse_config({**base, "surrogate": {"kappa": -1}})
    with pytest.raises(ConfigError, match=r"surrogate\.early_stop\.margin"):
        parse_config({**base, "surrogate": {"early_stop": {"margin": 0}}})
    assert parse_config(base).surrogate.enabled is False


def test_engine_ranks_proposals_with_the_m3gnet_descriptor(tmp_path: Path, models_dir: Path) -> None:
    """The engine path: rank 0 describes each proposal with one M3GNet pass (EMT relaxes, M3GNet ranks)."""
    surrogate = {**SURROGATE, "descriptor": "m3gnet", "early_stop": {"enabled": False}}
    config = emt_config(tmp_path, name="gp-m3gnet", evaluations=8, mode="ga", ga=GA, surrogate=surrogate)
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    statuses = [r["status"] for r in read_results(tmp_path / "run")]
    assert sum(Status(s).used_potential for s in statuses) == 8
    assert statuses.count("skipped") >= 2, "the GP on M3GNet descriptors must have ranked proposals"
