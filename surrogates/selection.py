"""The surrogate in the run loop: which of several screened proposals is relaxed, and learning from results.

``SurrogateSelection`` is both the engine's candidate selection and an observer of its commits. Once the GP
is ready it draws ``candidates_per_slot`` screened proposals per free worker, relaxes the one the
acquisition function ranks best and commits the others as ``skipped`` (no potential call, not counted
against the budget, told to the search so GA slots and PSO particles are freed). Every relaxed candidate
then teaches the GP (descriptor of its initial structure, relaxed enthalpy per atom), and the prediction
each chosen candidate got is stored with its result (``extra.surrogate``).

There is no surrogate state on disk: on resume the GP is rebuilt from the archive in commit order and makes
the same decisions as the run that was killed. Every proposal is archived as pending before it is ranked,
so a kill between ranking and the skipped commits only leaves them pending, and resume relaxes them:
nothing is lost, at worst a few relaxations are spent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from globopt.candidate import Evaluation, Status
from globopt.observers import CommitContext, CommitObserver
from surrogates.acquisition import Prediction, SurrogateScreen

if TYPE_CHECKING:
    from globopt.archive import Archive
    from globopt.engine import Engine, PendingCandidate

log = logging.getLogger("globopt")

# proposals screened out in a row while filling one slot's batch before the batch is ranked as it is
MAX_MISSES_PER_BATCH = 50


class SurrogateSelection(CommitObserver):
    label = "surrogate"

    def __init__(self, surrogate: SurrogateScreen, candidates_per_slot: int) -> None:
        self.surrogate = surrogate
        self.candidates_per_slot = candidates_per_slot
        self._predictions: dict[int, tuple[Prediction, object]] = {}  # pending id -> (prediction, descriptor)

    def run_started(self, archive: Archive, best, done: int, total: int) -> None:
        learned = self.surrogate.rebuild(archive)
        if learned:
            log.info("surrogate rebuilt from %d relaxed candidates in the archive", learned)

    # -- selection ---------------------------------------------------------------------------------------
    def choose(self, engine: Engine) -> PendingCandidate | None:
        if not self.surrogate.ready:  # too few relaxed structures to rank by: relax proposals as they come
            return engine.propose_pending()
        batch: list[PendingCandidate] = []
        misses = 0
        while len(batch) < self.candidates_per_slot and misses < MAX_MISSES_PER_BATCH:
            pending = engine.propose_pending()
            if pending is None:
                misses += 1
                continue
            misses = 0
            batch.append(pending)
        if not batch:
            return None
        descriptors = [self.surrogate.descriptor(p.structure) for p in batch]
        best = engine.best.enthalpy_per_atom if engine.best is not None else None
        formulas = hulls = None
        if self.surrogate.references is not None:  # a chemical system: rank by distance to the hull
            formulas = [p.structure.composition.reduced_formula for p in batch]
            hulls = [engine.search.best_known_enthalpy(p.structure) for p in batch]
        predictions = self.surrogate.rank(descriptors, best=best, formulas=formulas, hulls=hulls)
        chosen = min(range(len(batch)), key=lambda i: (predictions[i].score, batch[i].candidate_id))
        name = self.surrogate.acquisition.upper()
        for index, pending in enumerate(batch):
            if index == chosen:
                continue
            prediction = predictions[index]
            engine.commit(
                Evaluation(
                    pending.candidate_id,
                    Status.SKIPPED,
                    f"surrogate {name} {_acquisition_value(prediction, name)}, candidate "
                    f"{batch[chosen].candidate_id} ranked better "
                    f"({_acquisition_value(predictions[chosen], name)})",
                    extra={"surrogate": prediction.as_dict()},
                )
            )
        self._predictions[batch[chosen].candidate_id] = (predictions[chosen], descriptors[chosen])
        return batch[chosen]

    # -- learning ----------------------------------------------------------------------------------------
    def before_commit(self, evaluation: Evaluation) -> None:
        prediction, _ = self._predictions.get(evaluation.candidate_id, (None, None))
        if prediction is not None:
            evaluation.extra["surrogate"] = prediction.as_dict()

    def after_commit(self, evaluation: Evaluation, context: CommitContext) -> None:
        """Learn a relaxed result (the points acquisition.learned_points names), once it is committed."""
        _, descriptor = self._predictions.pop(evaluation.candidate_id, (None, None))
        if evaluation.status is not Status.RELAXED:
            return
        # chosen before the surrogate was ready, or re-issued after a resume: describe it from the archive
        initial_json = (
            None if descriptor is not None else context.archive.record(evaluation.candidate_id).initial_json
        )
        formula = evaluation.relaxed.composition.reduced_formula if evaluation.relaxed is not None else None
        self.surrogate.learn_result(
            evaluation.status, evaluation.enthalpy_per_atom, initial_json, initial_descriptor=descriptor,
            formula=formula,
        )  # fmt: skip


def _acquisition_value(prediction: Prediction, name: str) -> str:
    if name == "EI":
        return f"{prediction.ei * 1000:.2f} meV/atom"
    return f"{prediction.lcb:.3f} eV/atom"
