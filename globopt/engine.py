"""The run loop: search proposes, the evaluator pipeline screens and relaxes, the archive commits.

Order of events for one candidate (see DESIGN.md, data flow)::

    search.propose -> geometry check -> duplicate check -> archive (pending, with search state)
      -> scheduler (relax + analyse on a worker) -> relaxed-duplicate check
      -> archive (final, with search state) -> search.tell -> results.csv / best/ / progress

The archive row is written *before* work is handed out and *before* the search learns the result,
so a kill at any point loses nothing that was committed and repeats nothing: pending rows are simply
re-issued on resume.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections import deque
from dataclasses import dataclass

from pymatgen.core import Structure

from globopt.archive import Archive
from globopt.candidate import Evaluation, Proposal, RelaxTask, Status
from globopt.config import RunConfig
from globopt.duplicates import DuplicateIndex, lattice_minima, reduced_for_matching
from globopt.evaluator.early_stop import EarlyStopSettings
from globopt.evaluator.evaluate import EvaluatorSettings
from globopt.evaluator.known_minima import KnownMinimaSettings, KnownMinimum
from globopt.evaluator.relax import RelaxSettings
from globopt.geometry import GeometryLimits, geometry_limits, geometry_problem
from globopt.objectives import objective_values
from globopt.progress import Progress
from globopt.rundir import RunDirectory
from globopt.scheduler import make_scheduler
from globopt.search.base import SearchAlgorithm, SearchExhausted
from globopt.search.factory import make_search
from globopt.structure_codec import structure_from_json
from surrogates.acquisition import Prediction, SurrogateScreen

log = logging.getLogger("globopt")

# A task is re-issued after its worker died this many times before it is recorded as worker_died:
# one death may be bad luck (OOM from a neighbour), repeated deaths mean the structure kills workers.
MAX_ATTEMPTS = 3
# Consecutive candidates rejected before relaxation after which the search is clearly unable to
# produce sane structures under the configured checks.
MAX_CONSECUTIVE_REJECTIONS = 500
# Random structures one worker builds after a relaxation, at most (search/random_stream.py): enough to
# cover tiny cells, where most random proposals repeat, without delaying results noticeably.
MAX_PREBUILT_PER_TASK = 16
# best/ is rewritten on a new best at most this often (and always at the end): early in a run nearly every
# result is a new best, and symmetrising the top structures' CIFs then costs rank 0 more than the rest of
# its bookkeeping. The archive, not best/, is what a resume relies on.
BEST_WRITE_INTERVAL = 10.0


class Interrupted(BaseException):
    """SIGINT/SIGTERM: stop handing out work; pending candidates are re-issued on resume."""


@dataclass
class MasterCosts:
    """CPU seconds this process spends per phase, so users sizing an MPI job can see what limits rank 0.

    ``scheduler`` is time inside submit/collect: the MPI protocol, or the relaxations themselves when
    they run in-process. ``best_outputs`` is rewriting best/, at most once per BEST_WRITE_INTERVAL
    whatever the evaluation rate, so it is reported apart from the per-evaluation work. Everything else the
    loop does (archive transactions, results.csv, search state, progress) is ``bookkeeping``.
    """

    proposing: float = 0.0
    screening: float = 0.0
    matching_minima: float = 0.0
    best_outputs: float = 0.0
    scheduler: float = 0.0
    loop: float = 0.0
    proposals: int = 0

    @property
    def bookkeeping(self) -> float:
        return (
            self.loop
            - self.proposing
            - self.screening
            - self.matching_minima
            - self.best_outputs
            - self.scheduler
        )

    def summary(self, evaluations: int, random_here: int, random_elsewhere: int) -> str:
        n = max(evaluations, 1)

        def ms(seconds: float) -> str:
            return f"{1000 * seconds / n:.2f} ms"

        return (
            f"rank-0 CPU per evaluation: proposing {ms(self.proposing)}, screening {ms(self.screening)}, "
            f"matching minima {ms(self.matching_minima)}, bookkeeping {ms(self.bookkeeping)}, "
            f"scheduler {ms(self.scheduler)}, best/ rewrites {ms(self.best_outputs)}; "
            f"{self.proposals / n:.2f} proposals per evaluation; "
            f"random structures built here {random_here}, on workers {random_elsewhere}"
        )


@dataclass
class _PrebuildRate:
    """How many random structures the search consumes per relaxation (a running average)."""

    per_task: float = 2.0
    seen: int = 0

    def update(self, consumed: int) -> None:
        self.per_task = 0.8 * self.per_task + 0.2 * consumed


@dataclass
class RunSummary:
    evaluations: int
    budget: int
    best_id: int | None
    best_enthalpy_per_atom: float | None
    best_spacegroup: str | None
    wall_seconds: float
    potential_seconds: float
    relax_seconds: float
    interrupted: bool = False


class Engine:
    def __init__(self, config: RunConfig, run: RunDirectory, progress: Progress) -> None:
        self.config = config
        self.run_dir = run
        self.progress = progress
        self.archive: Archive = run.open_archive()
        self._limits_by_formula: dict[str, GeometryLimits] = {}
        if config.composition is not None:
            self.limits = geometry_limits(
                config.composition,
                config.composition.values(),  # proportions only: the same limits hold for every cell size
                config.checks.min_distance_factor,
                config.checks.volume_factor_range,
            )
            self.search: SearchAlgorithm = make_search(config, self.limits)
        else:  # htvs: compositions come from the enumeration; the relax guards use an envelope over them
            from globopt.htvs.limits import envelope_limits

            self.search = make_search(config, None)
            self.limits = envelope_limits(
                self.search.enumeration.elements,
                config.checks.min_distance_factor,
                config.checks.volume_factor_range,
            )
        state = self.archive.load_state()
        if state is not None:
            self.search.load_state_dict(state)
        dup = config.duplicates
        symprec = config.analysis.symprec
        self.initial_index = DuplicateIndex(dup.ltol, dup.stol, dup.angle_tol, dup.energy_tol, symprec)
        self.relaxed_index = DuplicateIndex(
            dup.ltol, dup.stol, dup.angle_tol, dup.energy_tol, symprec, bucket_by_spacegroup=False
        )
        self.best: tuple[float, int, str | None] | None = None
        self.costs = MasterCosts()
        self._best_written_at = -math.inf  # time.monotonic() of the last best/ write
        self._best_stale = False
        self._prebuild = _PrebuildRate()
        self._target_logged = False
        self._force_calls_logged = False
        self._force_calls = 0  # potential calls of committed evaluations (set from the archive in run())
        self._rebuild_indexes()
        # -- surrogate (issue 4): rebuilt from the archive, never stored apart
        self.surrogate: SurrogateScreen | None = None
        self._predictions: dict[int, tuple[Prediction, object]] = {}  # pending id -> (prediction, descriptor)
        early_stop = known_minima = None
        if config.surrogate.enabled:
            # several workers: results arrive in any order, so decisions depend on timing anyway, and a
            # refit that blocks the master idles all of them (gp.py)
            from globopt import mpi

            background = mpi.master_active() or config.workers > 1
            self.surrogate = SurrogateScreen.from_config(config, background_refit=background)
            learned = self.surrogate.rebuild(self.archive)
            if learned:
                log.info("surrogate rebuilt from %d relaxed candidates in the archive", learned)
            es = config.surrogate.early_stop
            if es.enabled:
                early_stop = EarlyStopSettings(margin=es.margin, min_steps=es.min_steps, window=es.window)
                if es.known_minima:
                    known_minima = KnownMinimaSettings(
                        ltol=dup.ltol,
                        stol=dup.stol,
                        angle_tol=dup.angle_tol,
                        energy_window=es.known_minima_window,
                        max_force=es.known_minima_max_force,
                    )
        self.settings = EvaluatorSettings(
            potential=config.potential.model_dump(),
            relax=RelaxSettings(
                fmax=config.relax.fmax,
                max_steps=config.relax.max_steps,
                pressure_gpa=config.relax.pressure_gpa,
                optimizer=config.relax.optimizer,
                relax_cell=config.relax.relax_cell,
                min_distance=self.limits.min_distance,
                volume_per_atom_range=self.limits.volume_per_atom_range,
            ),
            symprec=symprec,
            early_stop=early_stop,
            known_minima=known_minima,
            rattle=config.relax.rattle,
            seed=config.seed,
        )

    def _rebuild_indexes(self) -> None:
        """Duplicate indexes and the best-so-far are derived from the archive, never stored apart."""
        # skipped proposals were never relaxed: the search may propose them again
        for row in self.archive.rows("WHERE status NOT IN ('rejected', 'duplicate', 'skipped')"):
            self.initial_index.add(row["id"], structure_from_json(row["initial"]))
            if row["status"] == Status.RELAXED and row["duplicate_of"] is None:
                self.relaxed_index.add(
                    row["id"], structure_from_json(row["relaxed"]), row["enthalpy_per_atom"]
                )
                self._update_best(row["enthalpy_per_atom"], row["id"], row["spacegroup"])

    def _update_best(self, enthalpy: float, candidate_id: int, spacegroup: str | None) -> bool:
        if self.best is None or enthalpy < self.best[0] - 1e-9:
            self.best = (enthalpy, candidate_id, spacegroup)
            return True
        return False

    # -- main loop -----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        started = time.perf_counter()
        budget = self.config.budget.evaluations
        # repair rows a previous kill may have left out of results.csv
        self.run_dir.rewrite_results(self.archive, self.config.objectives)
        reissue: deque[RelaxTask] = deque(self.archive.pending_tasks())
        used = used_at_start = self.archive.count_used_potential()
        self._force_calls = self.archive.count_force_calls()
        if reissue:
            log.info(
                "resuming: %d evaluations committed, %d in flight at the kill are re-issued",
                used,
                len(reissue),
            )
        elif used:
            log.info("resuming: %d evaluations committed", used)
        # a finite search (htvs) may end before the budget: show progress against its size
        total = min(budget, getattr(self.search, "size_hint", budget))
        self.progress.start(total=total, done=used, best=self.best)
        scheduler = make_scheduler(self.settings, self.config.workers)
        stream = self.search.random_stream if scheduler.runs_elsewhere else None
        interrupted = False
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
        potential_seconds = relax_seconds = 0.0
        exhausted = False
        loop_started = time.process_time()
        try:
            rejections = 0
            while True:
                while scheduler.in_flight < scheduler.capacity and (
                    reissue
                    or (
                        not exhausted
                        and not self._target_reached()
                        and not self._force_calls_spent()
                        and used + scheduler.in_flight < budget
                    )
                ):
                    if reissue:
                        self._submit(scheduler, reissue.popleft())
                        continue
                    try:
                        task = self._next_task()
                    except SearchExhausted as exc:
                        if not getattr(self.search, "finite", False):
                            raise
                        log.info("%s", exc)  # a finite enumeration (htvs) has ended: finish in-flight work
                        exhausted = True
                        continue
                    if task is None:
                        rejections += 1
                        if rejections >= MAX_CONSECUTIVE_REJECTIONS:
                            raise SearchExhausted(
                                f"{rejections} consecutive candidates failed the geometry/duplicate checks; "
                                f"loosen checks.* or duplicates.* in the config"
                            )
                        continue
                    rejections = 0
                    if stream is not None:
                        self._ask_for_random_structures(task, stream, scheduler.capacity)
                    self._submit(scheduler, task)
                if scheduler.in_flight == 0:
                    break
                cpu = time.process_time()
                finished = scheduler.collect()
                self.costs.scheduler += time.process_time() - cpu
                for task, evaluation in finished:
                    if evaluation.generated:
                        self.search.deliver_generated(evaluation.generated)
                    elif task.generate and evaluation.status is Status.WORKER_DIED:
                        self.search.generation_lost(list(task.generate))
                    if evaluation.status is Status.WORKER_DIED and task.attempt < MAX_ATTEMPTS:
                        log.warning("candidate %d: %s; re-issuing", task.candidate_id, evaluation.reason)
                        retry = RelaxTask(task.candidate_id, task.structure, task.attempt + 1)
                        self.archive.record_attempt(task.candidate_id, retry.attempt)
                        reissue.append(retry)
                        continue
                    self._commit(evaluation)
                    used += 1
                    self._force_calls += evaluation.n_force_calls
                    potential_seconds += evaluation.potential_seconds
                    relax_seconds += evaluation.seconds
        except (KeyboardInterrupt, Interrupted):
            interrupted = True
            log.warning(
                "interrupted: committed results are kept; in-flight candidates are re-issued on resume"
            )
        finally:
            self.costs.loop += time.process_time() - loop_started
            signal.signal(signal.SIGTERM, previous_handler)
            scheduler.close()
            self.run_dir.rewrite_results(self.archive, self.config.objectives)
            self.run_dir.write_best(self.archive, self.config.output.n_best)
            if self.config.mode == "htvs":
                self._write_screen_outputs()
            self.progress.close()
            evaluations = self.archive.count_used_potential()
            random_stream = self.search.random_stream
            log.info(
                "%s",
                self.costs.summary(
                    evaluations - used_at_start,
                    random_stream.built_here if random_stream else 0,
                    random_stream.built_elsewhere if random_stream else 0,
                ),
            )
            # Closing checkpoints the WAL into archive.sqlite now, not whenever the garbage collector runs.
            self.archive.close()
        return RunSummary(
            evaluations=evaluations,
            budget=total,
            best_id=self.best[1] if self.best else None,
            best_enthalpy_per_atom=self.best[0] if self.best else None,
            best_spacegroup=self.best[2] if self.best else None,
            wall_seconds=time.perf_counter() - started,
            potential_seconds=potential_seconds,
            relax_seconds=relax_seconds,
            interrupted=interrupted,
        )

    def _target_reached(self) -> bool:
        """budget.target_enthalpy_per_atom met: the run hands out no new work (in-flight work finishes)."""
        target = self.config.budget.target_enthalpy_per_atom
        reached = target is not None and self.best is not None and self.best[0] <= target
        if reached and not self._target_logged:
            log.info(
                "target reached: candidate %d at %.4f eV/atom <= budget.target_enthalpy_per_atom %.4f; "
                "no new candidates are started",
                self.best[1], self.best[0], target,
            )  # fmt: skip
            self._target_logged = True
        return reached

    def _force_calls_spent(self) -> bool:
        """budget.force_calls used up: the run hands out no new work (in-flight work finishes)."""
        limit = self.config.budget.force_calls
        spent = limit is not None and self._force_calls >= limit
        if spent and not self._force_calls_logged:
            log.info(
                "force-call budget spent: %d potential calls >= budget.force_calls %d; "
                "no new candidates are started",
                self._force_calls, limit,
            )  # fmt: skip
            self._force_calls_logged = True
        return spent

    def _next_task(self) -> RelaxTask | None:
        """Screen one proposal; return a task to relax, or None when it was rejected (and recorded)."""
        if self.surrogate is not None and self.surrogate.ready:
            return self._next_task_by_surrogate()
        proposal = self._propose()
        screened = self._screen(proposal)
        if screened is None:
            return None
        key, reduced = screened
        candidate_id = self.archive.add_candidate(proposal, Status.PENDING, self._state_after_proposal)
        self.initial_index.add(candidate_id, proposal.structure, key=key, reduced=reduced)
        return self._task(candidate_id, proposal.structure)

    def _propose(self) -> Proposal:
        cpu = time.process_time()
        try:
            return self.search.propose()
        finally:
            self.costs.proposing += time.process_time() - cpu
            self.costs.proposals += 1

    def _submit(self, scheduler, task: RelaxTask) -> None:
        cpu = time.process_time()
        scheduler.submit(task)
        self.costs.scheduler += time.process_time() - cpu

    def _ask_for_random_structures(self, task: RelaxTask, stream, capacity: int) -> None:
        """Have the worker build the random structures the search will want next (random_stream.py).

        The search consumes about ``per_task`` numbered structures per relaxation; each task carries twice
        that many recipes, looking no further ahead than all tasks in flight can use, so little is built
        that the search never takes.
        """
        consumed = stream.next_index - self._prebuild.seen
        self._prebuild.seen = stream.next_index
        self._prebuild.update(consumed)
        count = min(MAX_PREBUILT_PER_TASK, math.ceil(2 * self._prebuild.per_task))
        if count:
            lookahead = math.ceil(2 * self._prebuild.per_task * capacity) + count
            task.generate = tuple(self.search.generation_requests(count, lookahead))

    def _screen(self, proposal: Proposal) -> tuple[tuple, Structure] | None:
        cpu = time.process_time()
        try:
            return self._screen_proposal(proposal)
        finally:
            self.costs.screening += time.process_time() - cpu

    def _screen_proposal(self, proposal: Proposal) -> tuple[tuple, Structure] | None:
        """Geometry and duplicate checks; None (recorded) if it fails, else the duplicate-index key and
        reduced cell, so indexing the proposal later does not reduce it again.

        A proposal built on a worker arrives with its geometry verdict, key and reduced cell
        (``Proposal.screening``), computed there with the same limits and symprec.
        """
        prepared = proposal.screening if self.config.composition is not None else None
        if prepared is not None:
            problem = prepared.geometry_problem
        else:
            problem = geometry_problem(proposal.structure, self._limits_for(proposal))
        if problem:
            self._record_screened(proposal, Status.REJECTED, problem)
            return None
        if prepared is not None and prepared.key is not None and prepared.reduced is not None:
            key, reduced, minima = prepared.key, prepared.reduced, prepared.minima
        else:
            key = self.initial_index.key(proposal.structure)
            reduced = reduced_for_matching(proposal.structure)
            minima = lattice_minima(reduced)
        match = self.initial_index.find(
            proposal.structure, key=key, reduced=reduced, minima=minima
        ) or self.relaxed_index.find(proposal.structure, reduced=reduced, minima=minima)
        if match is not None:
            self._record_screened(proposal, Status.DUPLICATE, f"same structure as candidate {match}", match)
            return None
        return key, reduced

    def _task(self, candidate_id: int, structure) -> RelaxTask:
        best = self.best[0] if self.best is not None and self.settings.early_stop is not None else None
        minima: tuple[KnownMinimum, ...] = ()
        if self.settings.known_minima is not None:
            count = self.config.surrogate.early_stop.known_minima_count
            minima = tuple(KnownMinimum(*entry) for entry in self.relaxed_index.lowest(count))
        return RelaxTask(candidate_id, structure, best_enthalpy_per_atom=best, known_minima=minima)

    # -- surrogate (issue 4) -------------------------------------------------------------------------
    def _next_task_by_surrogate(self) -> RelaxTask | None:
        """Draw ``candidates_per_slot`` screened proposals, relax the one with the lowest LCB.

        Every proposal is archived as pending first (so the search learns its id as usual); the ones not
        chosen are then committed as ``skipped`` (no potential call, not counted against the budget) and
        told to the search, which frees their GA slot / PSO particle. A kill in between leaves them
        pending, and resume relaxes them: nothing is lost, at worst a few relaxations are spent.
        """
        wanted = self.config.surrogate.candidates_per_slot
        batch: list[tuple[int, Structure, tuple]] = []
        misses = 0
        while len(batch) < wanted and misses < MAX_CONSECUTIVE_REJECTIONS // 10:
            proposal = self._propose()
            screened = self._screen(proposal)
            if screened is None:
                misses += 1
                continue
            misses = 0
            candidate_id = self.archive.add_candidate(proposal, Status.PENDING, self._state_after_proposal)
            batch.append((candidate_id, proposal.structure, screened))
        if not batch:
            return None
        descriptors = [self.surrogate.descriptor(structure) for _, structure, _ in batch]
        predictions = self.surrogate.rank(descriptors, best=self.best[0] if self.best is not None else None)
        chosen = min(range(len(batch)), key=lambda i: (predictions[i].score, batch[i][0]))
        name = self.surrogate.acquisition.upper()
        for index, (candidate_id, _structure, _key) in enumerate(batch):
            if index == chosen:
                continue
            prediction = predictions[index]
            skipped = Evaluation(
                candidate_id,
                Status.SKIPPED,
                f"surrogate {name} {_acquisition_value(prediction, name)}, candidate {batch[chosen][0]} "
                f"ranked better ({_acquisition_value(predictions[chosen], name)})",
                extra={"surrogate": prediction.as_dict()},
            )
            self.search.tell(candidate_id, skipped)
            self.archive.commit_evaluation(skipped, self.search.state_dict())
            self.run_dir.append_result(self.archive, candidate_id)
        candidate_id, structure, (key, reduced) = batch[chosen]
        self.initial_index.add(candidate_id, structure, key=key, reduced=reduced)
        self._predictions[candidate_id] = (predictions[chosen], descriptors[chosen])
        return self._task(candidate_id, structure)

    def _learn(self, evaluation: Evaluation) -> None:
        """Feed a finished candidate to the surrogate: the points acquisition.learned_points names."""
        prediction, descriptor = self._predictions.pop(evaluation.candidate_id, (None, None))
        if prediction is not None:
            evaluation.extra["surrogate"] = prediction.as_dict()
        if evaluation.status is not Status.RELAXED:
            return
        row = {
            "status": evaluation.status.value,
            # chosen before the surrogate was ready, or re-issued after a resume: no descriptor yet
            "initial": self.archive.row(evaluation.candidate_id)["initial"] if descriptor is None else None,
            "enthalpy_per_atom": evaluation.enthalpy_per_atom,
        }
        self.surrogate.learn_row(row, initial_descriptor=descriptor)

    def _limits_for(self, proposal: Proposal) -> GeometryLimits:
        """The run's limits, or for htvs (no fixed composition) limits of this proposal's composition."""
        if self.config.composition is not None:
            return self.limits
        structure = proposal.structure
        formula = structure.composition.reduced_formula
        if formula not in self._limits_by_formula:
            from globopt.htvs.limits import composition_limits

            checks = self.config.checks
            self._limits_by_formula[formula] = composition_limits(
                structure, checks.min_distance_factor, checks.volume_factor_range
            )
        return self._limits_by_formula[formula]

    def _write_screen_outputs(self) -> None:
        """ranked.csv, stable/ and hull plots; a failure here must not hide the run's own outcome."""
        from globopt.htvs.output import write_screen_outputs

        try:
            write_screen_outputs(self.run_dir.path, self.archive, self.config)
        except Exception:
            log.exception("could not write the htvs outputs; `globopt report %s` retries", self.run_dir.path)

    def _state_after_proposal(self, candidate_id: int) -> dict:
        self.search.proposed(candidate_id)
        return self.search.state_dict()

    def _record_screened(
        self, proposal: Proposal, status: Status, reason: str, duplicate_of: int | None = None
    ) -> None:
        def state_after(candidate_id: int) -> dict:
            # The search hears of the rejection like any other outcome, so a PSO particle or GA slot waiting
            # on this proposal is freed.
            self.search.proposed(candidate_id)
            self.search.tell(candidate_id, Evaluation(candidate_id, status, reason))
            return self.search.state_dict()

        candidate_id = self.archive.add_candidate(proposal, status, state_after, reason, duplicate_of)
        self.run_dir.append_result(self.archive, candidate_id)

    def _commit(self, evaluation: Evaluation) -> None:
        duplicate_of = supersedes = None
        new_best = False
        if evaluation.status is Status.RELAXED:
            if self.config.objectives:
                evaluation.extra["objectives"] = objective_values(evaluation.relaxed, self.config.objectives)
            cpu = time.process_time()
            duplicate_of, supersedes = self._classify_minimum(evaluation)
            self.costs.matching_minima += time.process_time() - cpu
            evaluation.duplicate_of, evaluation.supersedes = duplicate_of, supersedes
            if duplicate_of is None:
                new_best = self._update_best(
                    evaluation.enthalpy_per_atom, evaluation.candidate_id, evaluation.spacegroup
                )
        if self.surrogate is not None:
            self._learn(evaluation)
        self.search.tell(evaluation.candidate_id, evaluation)
        self.archive.commit_evaluation(evaluation, self.search.state_dict(), duplicate_of, supersedes)
        self.run_dir.append_result(self.archive, evaluation.candidate_id)
        self._best_stale |= new_best
        if self._best_stale and time.monotonic() - self._best_written_at >= BEST_WRITE_INTERVAL:
            cpu = time.process_time()
            self.run_dir.write_best(self.archive, self.config.output.n_best)
            self._best_written_at, self._best_stale = time.monotonic(), False
            self.costs.best_outputs += time.process_time() - cpu
        self.progress.finished(evaluation, duplicate_of, self.best)

    def _classify_minimum(self, evaluation: Evaluation) -> tuple[int | None, int | None]:
        """(duplicate_of, supersedes) for a relaxed structure.

        A match means the same minimum was found before. If this copy is relaxed to a lower enthalpy it
        becomes the minimum's representative (so best/ and the best-so-far show the lowest energy found),
        and the old representative is marked as its duplicate.
        """
        structure, energy, candidate_id = (
            evaluation.relaxed,
            evaluation.enthalpy_per_atom,
            evaluation.candidate_id,
        )
        reduced, minima = evaluation.relaxed_reduced, evaluation.relaxed_minima
        if reduced is None:
            reduced = reduced_for_matching(structure)
            minima = None
        match = self.relaxed_index.find(structure, energy, reduced=reduced, minima=minima)
        if match is None:
            self.relaxed_index.add(candidate_id, structure, energy, reduced=reduced)
            return None, None
        if energy < self.relaxed_index.energy_of(match):
            self.relaxed_index.replace(match, candidate_id, structure, energy, reduced=reduced)
            return None, match
        return match, None


def _acquisition_value(prediction: Prediction, name: str) -> str:
    if name == "EI":
        return f"{prediction.ei * 1000:.2f} meV/atom"
    return f"{prediction.lcb:.3f} eV/atom"


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")
