"""Test calculators for the batched path: EMT that takes several structures per call, and one that marks
a chosen step on disk (so a kill test can wait for that exact moment instead of racing the clock)."""

from __future__ import annotations

import os
from pathlib import Path

from ase.calculators.emt import EMT


class BatchedEMT(EMT):
    """ASE's EMT with ``calculate_batch``: each structure computed alone, the results returned together.

    No faster than EMT; it exercises globopt's batched relaxation (surrogates.potentials.BatchPotential)
    with a cheap real potential.
    """

    def calculate_batch(self, atoms_list):
        results = []
        for atoms in atoms_list:
            calculator = EMT()
            calculator.calculate(atoms.copy(), ["energy", "forces", "stress"])
            results.append({k: calculator.results[k] for k in ("energy", "forces", "stress")})
        self.batch_sizes.append(len(atoms_list))
        return results

    @property
    def batch_sizes(self) -> list[int]:
        if not hasattr(self, "_batch_sizes"):
            self._batch_sizes: list[int] = []
        return self._batch_sizes


class MarkingBatchedEMT(BatchedEMT):
    """BatchedEMT that creates the file ``$GLOBOPT_TEST_MARKER`` once it has made ``$GLOBOPT_TEST_MARK_AT``
    batched calls with at least two structures in flight: a deterministic moment in the middle of a batch."""

    def calculate_batch(self, atoms_list):
        results = super().calculate_batch(atoms_list)
        marker = os.environ.get("GLOBOPT_TEST_MARKER")
        if marker and len(atoms_list) >= 2:
            self._calls = getattr(self, "_calls", 0) + 1
            if self._calls == int(os.environ.get("GLOBOPT_TEST_MARK_AT", "5")):
                Path(marker).write_text(f"{os.getpid()}\n")
        return results
