"""The run loop: the search proposes, rank 0 screens, workers relax, the archive commits, observers react.

Order of events for one candidate (docs/architecture.md has the whole data flow)::

    search.propose -> geometry check -> duplicate check -> archive (pending, with search state)
      -> scheduler (relax + analyse on a worker) -> relaxed-duplicate check
      -> archive (final, with the search state that has learned it) -> observers

The archive row is written *before* work is handed out, and the result is committed together with the
search state that has learned it *before* anything else reacts, so a kill at any point loses nothing that
was committed and repeats nothing: pending rows are simply re-issued on resume.

This module knows no mode. Which proposals become relaxations is a ``CandidateSelection`` (the plain
default takes each screened proposal; the surrogate ranks several), and what happens after a commit is
the business of ``CommitObserver``s; ``globopt.pipeline`` assembles both from the config.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Protocol

from pymatgen.core import Structure

from globopt.archive import Archive
from globopt.candidate import ArchivedCell, Evaluation, Proposal, RelaxTask, Status
from globopt.evaluator.evaluate import EvaluatorSettings
from globopt.evaluator.known_minima import KnownMinimum
from globopt.observers import BestSoFar, CommitContext, CommitObserver, ObserverTimes, notify
from globopt.scheduler import Scheduler, make_scheduler
from globopt.screening import ProposalScreen, Screened, ScreenedOut
from globopt.search.base import BuildAhead, SearchAlgorithm, SearchExhausted

log = logging.getLogger("globopt")

# A task is re-issued after its worker died this many times before it is recorded as worker_died:
# one death may be bad luck (OOM from a neighbour), repeated deaths mean the structure kills workers.
MAX_ATTEMPTS = 3
# Consecutive candidates rejected before relaxation after which the search is clearly unable to
# produce sane structures under the configured checks.
MAX_CONSECUTIVE_REJECTIONS = 500
# Every this many evaluations the log says what rank 0's CPU cost per evaluation was over them.
COST_WINDOW = 1000
# Structures one worker builds ahead after a relaxation, at most (search/base.BuildAhead): enough to
# cover tiny cells, where most random proposals repeat, without delaying results noticeably.
MAX_PREBUILT_PER_TASK = 16


class Interrupted(BaseException):
    """SIGINT/SIGTERM: stop handing out work; pending candidates are re-issued on resume."""


@dataclass
class PendingCandidate:
    """A screened proposal stored as pending, not yet handed to a worker."""

    candidate_id: int
    structure: Structure
    screened: Screened


class CandidateSelection(Protocol):
    """Decides which screened proposal is relaxed next.

    ``choose`` may draw several proposals (``engine.propose_pending``) and commit the ones it does not
    relax as ``skipped`` (``engine.commit``); it returns the one to relax, or None when the proposals
    drawn this time were all screened out.
    """

    def choose(self, engine: Engine) -> PendingCandidate | None: ...


class TakeEachProposal:
    """The plain pipeline: every proposal that passes the screens is relaxed."""

    def choose(self, engine: Engine) -> PendingCandidate | None:
        return engine.propose_pending()


@dataclass
class MasterCosts:
    """CPU seconds this process spends per phase, so users sizing an MPI job can see what limits rank 0.

    ``scheduler`` is time inside submit/collect: the MPI protocol, or the relaxations themselves when
    they run in-process. Observers (results.csv, best/, progress, surrogate learning, ...) are timed one
    by one. Everything else the loop does (archive transactions, search state) is ``bookkeeping``.
    """

    proposing: float = 0.0
    screening: float = 0.0
    matching_minima: float = 0.0
    scheduler: float = 0.0
    loop: float = 0.0
    proposals: int = 0
    observers: ObserverTimes = field(default_factory=ObserverTimes)

    @property
    def bookkeeping(self) -> float:
        measured = self.proposing + self.screening + self.matching_minima + self.scheduler
        return self.loop - measured - self.observers.total

    def summary(
        self, evaluations: int, built_here: int, built_elsewhere: int, comparisons: tuple[int, int]
    ) -> str:
        n = max(evaluations, 1)
        fits, bounded = comparisons

        def ms(seconds: float) -> str:
            return f"{1000 * seconds / n:.2f} ms"

        observers = ", ".join(f"{name} {ms(seconds)}" for name, seconds in self.observers.seconds.items())
        return (
            f"rank-0 CPU per evaluation: proposing {ms(self.proposing)}, screening {ms(self.screening)}, "
            f"matching minima {ms(self.matching_minima)}, bookkeeping {ms(self.bookkeeping)}, "
            f"scheduler {ms(self.scheduler)}; observers: {observers or 'none'}; "
            f"{self.proposals / n:.2f} proposals per evaluation; "
            f"structures built or prepared ahead on rank 0 {built_here}, on workers {built_elsewhere}; "
            f"{fits / max(self.proposals, 1):.1f} StructureMatcher comparisons per proposal "
            f"({bounded} queries limited to the fingerprint-nearest)"
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
    session_evaluations: int = 0  # committed by this session (evaluations counts every session)


@dataclass(frozen=True)
class Budget:
    """When the run stops handing out work: whichever limit is reached first."""

    evaluations: int
    target_enthalpy_per_atom: float | None = None
    force_calls: int | None = None


class Engine:
    def __init__(
        self,
        archive: Archive,
        search: SearchAlgorithm,
        screen: ProposalScreen,
        settings: EvaluatorSettings,
        budget: Budget,
        workers: int = 1,
        selection: CandidateSelection | None = None,
        observers: list[CommitObserver] | None = None,
        known_minima_count: int = 0,
    ) -> None:
        self.archive = archive
        self.search = search
        self.screen = screen
        self.settings = settings
        self.budget = budget
        self.workers = workers
        self.selection = selection or TakeEachProposal()
        self.observers = list(observers or [])
        # early_stop.known_minima: relaxations watch for the lowest known minima (0: off)
        self.known_minima_count = known_minima_count
        self.costs = MasterCosts()
        self.best: BestSoFar | None = None
        for enthalpy, candidate_id, spacegroup in screen.rebuild(archive):
            self._update_best(enthalpy, candidate_id, spacegroup)
        self._prebuild = _PrebuildRate()
        self._target_logged = False
        self._force_calls_logged = False
        self._force_calls = 0  # potential calls of committed evaluations (set from the archive in run())
        # with workers in other processes, duplicate comparisons of proposals are made there (screening.py)
        self._defer_comparisons = False
        self._window_proposals = 0  # proposals screened before the current cost window

    def _update_best(self, enthalpy: float, candidate_id: int, spacegroup: str | None) -> bool:
        if self.best is None or enthalpy < self.best.enthalpy_per_atom - 1e-9:
            self.best = BestSoFar(enthalpy, candidate_id, spacegroup)
            return True
        return False

    # -- main loop -----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        started = time.perf_counter()
        budget = self.budget.evaluations
        reissue: deque[RelaxTask] = deque(
            replace(task, compare_with=self.screen.comparisons_for(task.candidate_id, task.structure))
            for task in self.archive.pending_tasks()
        )
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
        total = min(budget, self.search.size_hint or budget)
        loop_started = window_cpu = time.process_time()
        notify(self.observers, self.costs.observers, "run_started", self.archive, self.best, used, total)
        scheduler = make_scheduler(self.settings, self.workers)
        ahead = self.search.build_ahead if scheduler.runs_elsewhere else None
        self._defer_comparisons = scheduler.runs_elsewhere
        interrupted = False
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
        potential_seconds = relax_seconds = 0.0
        exhausted = False
        try:
            rejections = 0
            late_duplicates = 0  # consecutive proposals their workers found to be duplicates
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
                        if not self.search.finite:
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
                    if ahead is not None:
                        self._ask_for_structures_ahead(task, ahead, scheduler.capacity)
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
                        retry.compare_with = task.compare_with
                        self.archive.record_attempt(task.candidate_id, retry.attempt)
                        reissue.append(retry)
                        continue
                    self.commit(evaluation)
                    if not evaluation.status.used_potential:  # a duplicate found by its worker
                        late_duplicates += 1
                        if late_duplicates >= MAX_CONSECUTIVE_REJECTIONS:
                            raise SearchExhausted(
                                f"{late_duplicates} consecutive candidates were duplicates of archived "
                                f"structures; loosen duplicates.* in the config"
                            )
                        continue
                    late_duplicates = 0
                    used += 1
                    if (used - used_at_start) % COST_WINDOW == 0:
                        window_cpu = self._log_window_cost(used, window_cpu)
                    self._force_calls += evaluation.n_force_calls
                    potential_seconds += evaluation.potential_seconds
                    relax_seconds += evaluation.seconds
        except (KeyboardInterrupt, Interrupted):
            interrupted = True
            log.warning(
                "interrupted: committed results are kept; in-flight candidates are re-issued on resume"
            )
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            scheduler.close()
            notify(self.observers, self.costs.observers, "run_finished", self.archive, interrupted)
            self.costs.loop += time.process_time() - loop_started
            evaluations = self.archive.count_used_potential()
            prepared = self.search.build_ahead
            log.info(
                "%s",
                self.costs.summary(
                    evaluations - used_at_start,
                    prepared.built_here if prepared else 0,
                    prepared.built_elsewhere if prepared else 0,
                    self.screen.comparison_counts(),
                ),
            )
            # Closing checkpoints the WAL into archive.sqlite now, not whenever the garbage collector runs.
            self.archive.close()
        best = self.best
        return RunSummary(
            evaluations=evaluations,
            budget=total,
            best_id=best.candidate_id if best else None,
            best_enthalpy_per_atom=best.enthalpy_per_atom if best else None,
            best_spacegroup=best.spacegroup if best else None,
            wall_seconds=time.perf_counter() - started,
            potential_seconds=potential_seconds,
            relax_seconds=relax_seconds,
            interrupted=interrupted,
            session_evaluations=evaluations - used_at_start,
        )

    def _log_window_cost(self, used: int, since: float) -> float:
        """Rank 0's whole CPU per evaluation over the last COST_WINDOW evaluations (users sizing a job read
        how it grows with the archive), and the proposals it screened for them (a search whose proposals
        are more and more often duplicates costs more per evaluation); returns the new window's start."""
        now = time.process_time()
        proposals = self.costs.proposals - self._window_proposals
        self._window_proposals = self.costs.proposals
        log.info(
            "rank 0: %.2f ms CPU per evaluation over evaluations %d-%d (%.2f proposals per evaluation)",
            1000 * (now - since) / COST_WINDOW, used - COST_WINDOW + 1, used, proposals / COST_WINDOW,
        )  # fmt: skip
        return now

    def _target_reached(self) -> bool:
        """budget.target_enthalpy_per_atom met: the run hands out no new work (in-flight work finishes)."""
        target = self.budget.target_enthalpy_per_atom
        reached = target is not None and self.best is not None and self.best.enthalpy_per_atom <= target
        if reached and not self._target_logged:
            log.info(
                "target reached: candidate %d at %.4f eV/atom <= budget.target_enthalpy_per_atom %.4f; "
                "no new candidates are started",
                self.best.candidate_id, self.best.enthalpy_per_atom, target,
            )  # fmt: skip
            self._target_logged = True
        return reached

    def _force_calls_spent(self) -> bool:
        """budget.force_calls used up: the run hands out no new work (in-flight work finishes)."""
        limit = self.budget.force_calls
        spent = limit is not None and self._force_calls >= limit
        if spent and not self._force_calls_logged:
            log.info(
                "force-call budget spent: %d potential calls >= budget.force_calls %d; "
                "no new candidates are started",
                self._force_calls, limit,
            )  # fmt: skip
            self._force_calls_logged = True
        return spent

    # -- from proposal to task -------------------------------------------------------------------------
    def _next_task(self) -> RelaxTask | None:
        """The next candidate to relax, or None when this try's proposals were all screened out."""
        chosen = self.selection.choose(self)
        if chosen is None:
            return None
        self.screen.index_proposal(chosen.candidate_id, chosen.structure, chosen.screened)
        return self._task(chosen.candidate_id, chosen.structure, chosen.screened.compare_with)

    def propose_pending(self) -> PendingCandidate | None:
        """One proposal through the screens: stored as pending if it passes, recorded (and None) if not."""
        proposal = self._propose()
        cpu = time.process_time()
        try:
            verdict = self.screen.screen(proposal, self._defer_comparisons)
        finally:
            self.costs.screening += time.process_time() - cpu
        if isinstance(verdict, ScreenedOut):
            self._record_screened_out(proposal, verdict)
            return None
        candidate_id = self.archive.add_candidate(proposal, Status.PENDING, self._state_after_proposal)
        return PendingCandidate(candidate_id, proposal.structure, verdict)

    def _propose(self) -> Proposal:
        cpu = time.process_time()
        try:
            return self.search.propose()
        finally:
            self.costs.proposing += time.process_time() - cpu
            self.costs.proposals += 1

    def _task(
        self, candidate_id: int, structure: Structure, compare_with: tuple[ArchivedCell, ...] = ()
    ) -> RelaxTask:
        best = self.search.best_known_enthalpy(structure)
        if best is None and self.best is not None:
            best = self.best.enthalpy_per_atom
        minima: tuple[KnownMinimum, ...] = ()
        if self.known_minima_count:
            minima = tuple(
                KnownMinimum(*entry) for entry in self.screen.lowest_minima(self.known_minima_count)
            )
        return RelaxTask(
            candidate_id, structure, best_enthalpy_per_atom=best, known_minima=minima,
            compare_with=compare_with,
        )  # fmt: skip

    def _submit(self, scheduler: Scheduler, task: RelaxTask) -> None:
        cpu = time.process_time()
        scheduler.submit(task)
        self.costs.scheduler += time.process_time() - cpu

    def _ask_for_structures_ahead(self, task: RelaxTask, ahead: BuildAhead, capacity: int) -> None:
        """Have the worker build the structures the search will want next (search/base.BuildAhead).

        The search consumes about ``per_task`` numbered structures per relaxation; each task carries twice
        that many recipes, looking no further ahead than all tasks in flight can use, so little is built
        that the search never takes.
        """
        consumed = ahead.next_index - self._prebuild.seen
        self._prebuild.seen = ahead.next_index
        self._prebuild.update(consumed)
        count = min(MAX_PREBUILT_PER_TASK, math.ceil(2 * self._prebuild.per_task))
        if count:
            lookahead = math.ceil(2 * self._prebuild.per_task * capacity) + count
            task.generate = tuple(self.search.generation_requests(count, lookahead))

    def _state_after_proposal(self, candidate_id: int) -> dict:
        self.search.proposed(candidate_id)
        return self.search.state_dict()

    def _record_screened_out(self, proposal: Proposal, verdict: ScreenedOut) -> None:
        def state_after(candidate_id: int) -> dict:
            # The search hears of the rejection like any other outcome, so a PSO particle or GA slot waiting
            # on this proposal is freed.
            self.search.proposed(candidate_id)
            self.search.tell(candidate_id, Evaluation(candidate_id, verdict.status, verdict.reason))
            return self.search.state_dict()

        candidate_id = self.archive.add_candidate(
            proposal, verdict.status, state_after, verdict.reason, verdict.duplicate_of
        )
        outcome = Evaluation(candidate_id, verdict.status, verdict.reason, duplicate_of=verdict.duplicate_of)
        context = CommitContext(self.archive, self.best, new_best=False)
        notify(self.observers, self.costs.observers, "after_commit", outcome, context)

    # -- commit ----------------------------------------------------------------------------------------
    def commit(self, evaluation: Evaluation) -> None:
        """Record an outcome: the durability rule (archive and search state in one transaction), then
        the observers."""
        duplicate_of = supersedes = None
        new_best = False
        if evaluation.status is Status.DUPLICATE:  # compared on its worker before relaxing
            self.screen.forget_proposal(evaluation.candidate_id)
            duplicate_of = evaluation.duplicate_of
        if evaluation.status is Status.RELAXED:
            cpu = time.process_time()
            duplicate_of, supersedes = self.screen.classify_minimum(evaluation)
            self.costs.matching_minima += time.process_time() - cpu
            evaluation.duplicate_of, evaluation.supersedes = duplicate_of, supersedes
            if duplicate_of is None:
                new_best = self._update_best(
                    evaluation.enthalpy_per_atom, evaluation.candidate_id, evaluation.spacegroup
                )
        notify(self.observers, self.costs.observers, "before_commit", evaluation)
        self.search.tell(evaluation.candidate_id, evaluation)
        self.archive.commit_evaluation(evaluation, self.search.state_dict(), duplicate_of, supersedes)
        context = CommitContext(self.archive, self.best, new_best)
        notify(self.observers, self.costs.observers, "after_commit", evaluation, context)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")
