"""Assembles the engine for one run from its config: the one place that knows what each mode needs.

The engine itself holds only the loop and its durability rule. Which search proposes, which checks and
limits apply, how proposals are chosen for relaxation (plain, or ranked by the surrogate), what each
relaxation is told (early stop, known minima) and which observers react to a commit all follow from the
config, here.
"""

from __future__ import annotations

from globopt.archive import ArchiveError, damaged_message
from globopt.config import RunConfig
from globopt.engine import Budget, Engine
from globopt.evaluator.compare import MatchTolerances
from globopt.evaluator.early_stop import EarlyStopSettings
from globopt.evaluator.evaluate import EvaluatorSettings
from globopt.evaluator.known_minima import KnownMinimaSettings
from globopt.evaluator.relax import RelaxSettings
from globopt.geometry import GeometryLimits
from globopt.observers import BestStructures, CommitObserver, ObjectiveValues, ProgressDisplay, ResultsTable
from globopt.progress import Progress
from globopt.rundir import RunDirectory
from globopt.screening import ProposalScreen
from globopt.search.base import SearchAlgorithm
from globopt.search.factory import make_search


def build_engine(config: RunConfig, run: RunDirectory, progress: Progress) -> Engine:
    archive = run.open_archive()
    search = make_search(config)
    state = archive.load_state()
    if state is not None:
        try:
            search.load_state_dict(state)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            archive.close()
            detail = (
                f"its stored search state does not fit a {config.mode} search ({type(exc).__name__}: {exc})"
            )
            raise ArchiveError(damaged_message(archive.path, detail)) from None
    observers: list[CommitObserver] = []
    if config.objectives:
        observers.append(ObjectiveValues(config.objectives))
    selection = None
    if config.surrogate.enabled:
        selection = _surrogate_selection(config)
        observers.append(selection)
    observers.append(ResultsTable(run, config.objectives))
    if config.chemical_system is None:  # across compositions the lowest enthalpy per atom means nothing
        observers.append(BestStructures(run, config.output.n_best))
    observers.append(ProgressDisplay(progress))
    if config.mode == "htvs":
        from globopt.htvs.output import ScreenOutputs

        observers.append(ScreenOutputs(run.path, config))
    if config.chemical_system is not None:
        from globopt.hull.output import HullOutputs

        observers.append(HullOutputs(run.path, config))
    es = config.surrogate.early_stop
    watch_minima = config.surrogate.enabled and es.enabled and es.known_minima
    return Engine(
        archive,
        search,
        ProposalScreen.from_config(search, config),
        evaluator_settings(config, search),
        Budget(
            config.budget.evaluations,
            config.budget.target_enthalpy_per_atom,
            config.budget.force_calls,
        ),
        workers=config.workers,
        selection=selection,
        observers=observers,
        known_minima_count=es.known_minima_count if watch_minima else 0,
    )


def evaluator_settings(config: RunConfig, search: SearchAlgorithm) -> EvaluatorSettings:
    """What every worker needs to relax this run's candidates (picklable, sent once per worker)."""
    early_stop = known_minima = None
    es = config.surrogate.early_stop
    if config.surrogate.enabled and es.enabled:
        early_stop = EarlyStopSettings(margin=es.margin, min_steps=es.min_steps, window=es.window)
        if es.known_minima:
            dup = config.duplicates
            known_minima = KnownMinimaSettings(
                ltol=dup.ltol,
                stol=dup.stol,
                angle_tol=dup.angle_tol,
                energy_window=es.known_minima_window,
                max_force=es.known_minima_max_force,
            )
    return EvaluatorSettings(
        potential=config.potential.model_dump(),
        relax=relax_settings(config, search.limits),
        symprec=config.analysis.symprec,
        early_stop=early_stop,
        known_minima=known_minima,
        rattle=config.relax.rattle,
        seed=config.seed,
        batch_size=None if config.relax.batch_size == "auto" else config.relax.batch_size,
        match_tolerances=MatchTolerances(
            config.duplicates.ltol, config.duplicates.stol, config.duplicates.angle_tol
        ),
    )


def relax_settings(config: RunConfig, limits: GeometryLimits) -> RelaxSettings:
    """The relaxation a config asks for, with the geometry guards of ``limits``."""
    relax = config.relax
    return RelaxSettings(
        fmax=relax.fmax,
        max_steps=relax.max_steps,
        pressure_gpa=relax.pressure_gpa,
        optimizer=relax.optimizer,
        relax_cell=relax.relax_cell,
        extend_steps=relax.extend_steps,
        extend_margin=relax.extend_margin,
        min_distance=limits.min_distance,
        volume_per_atom_range=limits.volume_per_atom_range,
    )


def _surrogate_selection(config: RunConfig):
    from globopt import mpi
    from surrogates.acquisition import SurrogateScreen
    from surrogates.selection import SurrogateSelection

    # several workers: results arrive in any order, so decisions depend on timing anyway, and a refit
    # that blocks the master idles all of them (surrogates/gp.py)
    background = mpi.master_active() or config.workers > 1
    surrogate = SurrogateScreen.from_config(config, background_refit=background)
    return SurrogateSelection(surrogate, config.surrogate.candidates_per_slot)
