"""Many relaxations in lockstep, fed by one batched potential call per optimiser step.

A universal potential on a small cell spends most of a call in fixed per-call costs, so a worker that
relaxes one structure at a time wastes most of its core (or nearly all of a GPU). Here each structure keeps
its own ASE optimiser, cell filter, guards and early stops (relax.Relaxation, the very code of the single
path), and only the potential evaluation is shared: all relaxations in flight are evaluated in one
``calculate_batch`` call, each is served its result, and each takes its own next step.

In-flight batching: a relaxation that finishes (converged, unconverged, exploded, stopped early, failed)
leaves at once and the caller may add the next candidate before the following step, so one slow relaxation
never holds the others back and the batch stays full.

Why lockstep ASE optimisers rather than a batched optimiser on tensors (torch-sim): every structure takes
exactly the steps of the single path, so statuses, step counts and energies agree with it to the potential's
float32 round-off, and the guards, early stop and known-minima watch are shared code. The optimiser, cell
filter and guards cost about 1 ms of Python per structure and step against 5-6 ms of batched M3GNet per
8-atom structure on one CPU thread (docs/throughput.md has the measurement and the comparison).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from typing import Any

from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from globopt.evaluator.early_stop import EarlyStopper
from globopt.evaluator.known_minima import KnownMinimaWatch
from globopt.evaluator.relax import Relaxation, RelaxOutcome, RelaxSettings
from surrogates.potentials import BatchPotential, ExactStateCheck


class MissingResult(RuntimeError):
    """A relaxation asked for a configuration the batched call did not evaluate (a driver bug)."""


class ServedCalculator(ExactStateCheck, Calculator):
    """An ASE calculator that only answers for the configuration whose results it was served.

    ASE caches a calculator's results while the atoms are unchanged, so serving sets both the cached
    configuration and the results; any request for another configuration reaches ``calculate`` and fails.
    """

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def serve(self, atoms: Atoms, results: dict[str, Any]) -> None:
        self.atoms = atoms.copy()
        self.results = dict(results)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        raise MissingResult("no batched potential result for this configuration")


class _Member:
    """One relaxation in the batch and the key its caller knows it by."""

    __slots__ = ("calculator", "key", "relaxation")

    def __init__(self, key: Hashable, relaxation: Relaxation, calculator: ServedCalculator) -> None:
        self.key, self.relaxation, self.calculator = key, relaxation, calculator


class BatchRelaxer:
    """Relaxations in flight, advanced together: ``add`` any time, ``step`` returns those that finished."""

    def __init__(self, potential: BatchPotential, settings: RelaxSettings) -> None:
        self.potential = potential
        self.settings = settings
        self._members: list[_Member] = []
        self.batch_calls = 0
        self.structure_calls = 0

    def __len__(self) -> int:
        return len(self._members)

    @property
    def atoms_in_flight(self) -> int:
        return sum(m.relaxation.n_atoms for m in self._members)

    def add(
        self,
        key: Hashable,
        atoms: Atoms,
        stopper: EarlyStopper | None = None,
        watch: KnownMinimaWatch | None = None,
        best_enthalpy_per_atom: float | None = None,
    ) -> None:
        """Start a relaxation; its first potential evaluation is part of the next ``step``."""
        calculator = ServedCalculator()
        relaxation = Relaxation(
            atoms, calculator, self.settings, stopper=stopper, watch=watch,
            best_enthalpy_per_atom=best_enthalpy_per_atom,
        )  # fmt: skip
        self._members.append(_Member(key, relaxation, calculator))

    def step(self) -> list[tuple[Hashable, RelaxOutcome]]:
        """One batched potential call for every relaxation in flight, then one optimiser step each."""
        members = self._members
        if not members:
            return []
        results = self._evaluate(members)
        finished = []
        for member, result in zip(members, results, strict=True):
            relaxation = member.relaxation
            done = relaxation.fail(result) if isinstance(result, Exception) else relaxation.advance()
            if done:
                finished.append((member.key, relaxation.outcome()))
        if finished:
            self._members = [m for m in members if not m.relaxation.finished]
        return finished

    def _evaluate(self, members: Sequence[_Member]) -> list[dict[str, Any] | Exception]:
        """Results for every member (or the exception its structure raised), served to its calculator.

        A batched call that raises is repeated structure by structure, so that only the structure the
        potential cannot handle fails, as it would on the single path.
        """
        atoms = [m.relaxation.atoms for m in members]
        started = time.perf_counter()
        try:
            results: list[dict[str, Any] | Exception] = list(self.potential.calculate_batch(atoms))
            shares = _shares(time.perf_counter() - started, atoms)
            self.batch_calls += 1
        except Exception:
            results, shares = [], []
            for single in atoms:
                started = time.perf_counter()
                try:
                    results.append(self.potential.calculate_batch([single])[0])
                except Exception as exc:
                    results.append(exc)
                shares.append(time.perf_counter() - started)
                self.batch_calls += 1
        self.structure_calls += len(members)
        for member, result, seconds in zip(members, results, shares, strict=True):
            relaxation = member.relaxation
            relaxation.served_calls += 1
            relaxation.served_seconds += seconds
            if not isinstance(result, Exception):
                member.calculator.serve(relaxation.atoms, result)
        return results


def _shares(seconds: float, atoms: Sequence[Atoms]) -> list[float]:
    """A batched call's time split by atom count: what each structure's potential time is reported as."""
    total = sum(len(a) for a in atoms) or 1
    return [seconds * len(a) / total for a in atoms]
