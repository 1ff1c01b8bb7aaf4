"""What happens when a candidate's outcome is committed: the observers of the commit.

The engine holds the loop and its durability rule (a result is in the archive, together with the search
state that has learned it, before anything else sees it). Everything that merely reacts to a committed
outcome is an observer: results.csv, best/, the progress display, the extra objective values, the
surrogate's learning, a screen's ranking and hulls. A new mode or output adds an observer; the engine
does not change.

Every hook runs on rank 0 and must be quick: the engine times each observer and reports its share of
rank 0's CPU at the end of a run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from globopt.candidate import Evaluation, Status

if TYPE_CHECKING:
    from globopt.archive import Archive
    from globopt.progress import Progress
    from globopt.rundir import RunDirectory


@dataclass(frozen=True)
class BestSoFar:
    """The lowest-enthalpy unique relaxed structure of the run."""

    enthalpy_per_atom: float
    candidate_id: int
    spacegroup: str | None

    def as_tuple(self) -> tuple[float, int, str | None]:
        return (self.enthalpy_per_atom, self.candidate_id, self.spacegroup)


@dataclass(frozen=True)
class CommitContext:
    """What the engine knows about a commit beyond the evaluation itself."""

    archive: Archive
    best: BestSoFar | None  # after this commit
    new_best: bool  # this evaluation became the best so far


class CommitObserver:
    """Base class: override the hooks you need (all default to doing nothing).

    An observer that could not write its output (the archive, which holds everything, is unaffected) sets
    ``failure`` to a message saying so; the command then ends with exit code 2 instead of claiming success.
    """

    failure: str | None = None

    def run_started(self, archive: Archive, best: BestSoFar | None, done: int, total: int) -> None:
        """Before the first proposal of this session; ``done`` evaluations were committed before."""

    def before_commit(self, evaluation: Evaluation) -> None:
        """May add to ``evaluation.extra``, which is stored with the result in the same transaction."""

    def after_commit(self, evaluation: Evaluation, context: CommitContext) -> None:
        """Every outcome, screened out before relaxation or relaxed, once it is in the archive."""

    def run_finished(self, archive: Archive, interrupted: bool) -> None:
        """After the loop (also after an interruption): rewrite derived outputs from the archive."""


class ObserverTimes:
    """CPU seconds spent in each observer, for the rank-0 cost report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, observer: CommitObserver, seconds: float) -> None:
        name = getattr(observer, "label", type(observer).__name__)
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def notify(observers: list[CommitObserver], times: ObserverTimes, hook: str, *args) -> None:
    """Call one hook on every observer, in order, timing each."""
    for observer in observers:
        cpu = time.process_time()
        getattr(observer, hook)(*args)
        times.add(observer, time.process_time() - cpu)


# -- the observers every run has --------------------------------------------------------------------------
class ResultsTable(CommitObserver):
    """results.csv: one row appended per outcome; regenerated from the archive at start and end."""

    label = "results.csv"

    def __init__(self, run: RunDirectory, objectives) -> None:
        self.run = run
        self.objectives = objectives

    def run_started(self, archive: Archive, best: BestSoFar | None, done: int, total: int) -> None:
        self.run.rewrite_results(archive, self.objectives)  # rows a kill left out

    def after_commit(self, evaluation: Evaluation, context: CommitContext) -> None:
        self.run.append_result(context.archive, evaluation.candidate_id)

    def run_finished(self, archive: Archive, interrupted: bool) -> None:
        self.run.rewrite_results(archive, self.objectives)


class BestStructures(CommitObserver):
    """best/: the lowest-enthalpy unique structures as CIF, rewritten on a new best at most every
    ``interval`` seconds (and always at the end).

    Early in a run nearly every result is a new best, and symmetrising the top structures' CIFs then costs
    rank 0 more than the rest of its bookkeeping; the archive, not best/, is what a resume relies on.
    """

    label = "best/ rewrites"

    def __init__(self, run: RunDirectory, n_best: int, interval: float = 10.0) -> None:
        self.run = run
        self.n_best = n_best
        self.interval = interval
        self._written_at = -float("inf")
        self._stale = False

    def after_commit(self, evaluation: Evaluation, context: CommitContext) -> None:
        self._stale |= context.new_best
        if self._stale and time.monotonic() - self._written_at >= self.interval:
            self.run.write_best(context.archive, self.n_best)
            self._written_at, self._stale = time.monotonic(), False

    def run_finished(self, archive: Archive, interrupted: bool) -> None:
        self.run.write_best(archive, self.n_best)


class ProgressDisplay(CommitObserver):
    """The progress bar on a terminal, a log line per relaxation otherwise."""

    label = "progress"

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def run_started(self, archive: Archive, best: BestSoFar | None, done: int, total: int) -> None:
        self.progress.start(total=total, done=done, best=best.as_tuple() if best else None)

    def after_commit(self, evaluation: Evaluation, context: CommitContext) -> None:
        if evaluation.status.used_potential:
            best = context.best.as_tuple() if context.best else None
            self.progress.finished(evaluation, evaluation.duplicate_of, best)

    def run_finished(self, archive: Archive, interrupted: bool) -> None:
        self.progress.close()


class ObjectiveValues(CommitObserver):
    """The configured extra objectives of every relaxed structure, stored with its result."""

    label = "objectives"

    def __init__(self, objectives) -> None:
        self.objectives = objectives

    def before_commit(self, evaluation: Evaluation) -> None:
        if evaluation.status is Status.RELAXED and evaluation.relaxed is not None:
            from globopt.objectives import objective_values

            evaluation.extra["objectives"] = objective_values(evaluation.relaxed, self.objectives)
