"""The worker side with batching: several candidates in flight, relaxed together, analysed one by one.

Every scheduler backend that batches (in-process, MPI rank) holds one :class:`BatchEvaluator`: it hands
each task to the lockstep relaxer (batch_relax.py) as soon as there is room, advances all relaxations with
one batched potential call per ``step``, and returns each finished candidate's Evaluation exactly as
``evaluate`` makes it for the single path (same rattle, early stop, known-minima watch, analysis and
random structures for rank 0).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from globopt.candidate import Evaluation, RelaxTask
from globopt.evaluator.batch_relax import BatchRelaxer
from globopt.evaluator.batch_size import BatchLimits, batch_limits
from globopt.evaluator.evaluate import (
    EvaluatorSettings,
    _calculator,
    analyse,
    build_requested,
    prepare,
    screen_on_worker,
)
from surrogates.potentials import batch_potential


class BatchEvaluator:
    """Candidates in flight on one worker: ``submit`` any time, ``step`` returns those that finished."""

    def __init__(
        self, settings: EvaluatorSettings, limits: BatchLimits, between: Callable[[], None] | None = None
    ) -> None:
        potential = batch_potential(_calculator(settings))
        if potential is None:
            raise ValueError(f"potential {settings.potential.get('kind')!r} cannot evaluate a batch")
        self.settings = settings
        self.limits = limits
        self.between = between  # heartbeats while random structures are built after a relaxation
        self.relaxer = BatchRelaxer(potential, settings.relax)
        self.relaxing: dict[int, RelaxTask] = {}
        self.waiting: deque[RelaxTask] = deque()  # held here until the batch has room
        # found to be duplicates before relaxing (RelaxTask.compare_with): returned by the next step
        self.screened: list[tuple[RelaxTask, Evaluation]] = []

    def __len__(self) -> int:
        return len(self.relaxing) + len(self.waiting) + len(self.screened)

    def tasks(self) -> list[RelaxTask]:
        """Every task this worker holds, relaxing, waiting or screened out and not yet returned."""
        return [*self.relaxing.values(), *self.waiting, *(task for task, _ in self.screened)]

    def submit(self, task: RelaxTask) -> None:
        self.waiting.append(task)
        self._fill()

    def step(self) -> list[tuple[RelaxTask, Evaluation]]:
        """One batched potential call and optimiser step; the candidates that finished with it (and those
        found to be duplicates before relaxing)."""
        finished, self.screened = self.screened, []
        if self.relaxing:
            for candidate_id, outcome in self.relaxer.step():
                task = self.relaxing.pop(candidate_id)
                result = analyse(task, self.settings, outcome)
                build_requested(task, self.settings, result, self.between)
                finished.append((task, result))
        self._fill()
        return finished

    def _fill(self) -> None:
        """Start waiting tasks while the batch has room (structures, and atoms on a GPU)."""
        while self.waiting and len(self.relaxing) < self.limits.structures:
            task = self.waiting[0]
            cap = self.limits.atoms
            if cap is not None and self.relaxing and self.relaxer.atoms_in_flight + len(task.structure) > cap:
                return
            self.waiting.popleft()
            duplicate = screen_on_worker(task, self.settings, self.between)
            if duplicate is not None:
                self.screened.append((task, duplicate))
                continue
            atoms, stopper, watch = prepare(task, self.settings)
            self.relaxer.add(task.candidate_id, atoms, stopper, watch, task.best_enthalpy_per_atom)
            self.relaxing[task.candidate_id] = task


def worker_limits(settings: EvaluatorSettings) -> BatchLimits:
    """How many candidates this process relaxes at once (loads the potential if it is not yet)."""
    can = batch_potential(_calculator(settings)) is not None
    return batch_limits(settings.batch_size, can, str(settings.potential.get("device", "cpu")))
