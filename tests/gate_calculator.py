"""Calculators that stop a run at a chosen point until the test lets it go: the kill tests' clock.

A test that kills a run must kill it at a known point, or it proves nothing on a machine fast enough to
finish the run first and times out on a slow one. These calculators are real potentials (EMT, or the real
M3GNet) with a gate in front of every force call. The run uses them through the ordinary config::

    potential: {kind: ase, calculator: "gate_calculator:GatedEMT"}

Without ``GLOBOPT_TEST_GATE`` in the environment the gate is open and they are plain EMT / M3GNet. With it,
it names a folder holding ``plan.json`` (written by ``helpers.Gate``)::

    {"archive": ".../archive.sqlite", "after": 3}

Once the archive holds ``after`` committed evaluations, the first force call of any process of the run
creates ``blocked`` in that folder (exclusively: one process blocks, the others go on) holding its pid and
the committed count, and waits until ``release`` appears. That process is then inside a relaxation, with
exactly the evaluations committed that the test asked for (for a serial run), for as long as the test
needs.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

GATE_VARIABLE = "GLOBOPT_TEST_GATE"
# A safety net only: a gate the test never releases (the test failed before killing the run) gives up.
LONGEST_BLOCK = 1800.0
_USED_POTENTIAL = "status NOT IN ('pending', 'rejected', 'duplicate', 'skipped')"


class _Gate:
    """The calculator's side: checks the plan at every force call until it has blocked (or never will)."""

    def __init__(self) -> None:
        folder = os.environ.get(GATE_VARIABLE)
        self.folder = Path(folder) if folder else None
        self.done = self.folder is None
        self.archive: Path | None = None
        self.after = 0
        self._db: sqlite3.Connection | None = None
        if self.folder is not None:
            plan = json.loads((self.folder / "plan.json").read_text())
            self.archive, self.after = Path(plan["archive"]), int(plan["after"])

    def wait_if_due(self) -> None:
        if self.done:
            return
        assert self.folder is not None
        if (self.folder / "release").exists():
            self.done = True
            return
        committed = self._committed()
        if committed < self.after:
            return
        self.done = True
        try:
            handle = os.open(self.folder / "blocked", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another process of the run holds the gate
            return
        with os.fdopen(handle, "w") as marker:
            json.dump({"pid": os.getpid(), "committed": committed}, marker)
        deadline = time.monotonic() + LONGEST_BLOCK
        while not (self.folder / "release").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test gate in {self.folder} was never released")
            time.sleep(0.02)

    def _committed(self) -> int:
        if self._db is None:
            if self.archive is None or not self.archive.exists():
                return 0
            self._db = sqlite3.connect(f"file:{quote(str(self.archive))}?mode=ro", uri=True, timeout=30)
        try:
            return int(
                self._db.execute(f"SELECT COUNT(*) FROM candidates WHERE {_USED_POTENTIAL}").fetchone()[0]
            )
        except sqlite3.OperationalError:  # the schema is not there yet
            return 0


class GatedEMT(EMT):
    """ASE's EMT behind the test gate."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._gate = _Gate()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        self._gate.wait_if_due()
        super().calculate(atoms, properties, system_changes)


class GatedM3GNet(Calculator):
    """The real M3GNet (surrogates.m3gnet, the loader globopt itself uses) behind the test gate."""

    def __init__(self, model: str = "M3GNet-MP-2021.2.8-PES", **kwargs) -> None:
        from surrogates.m3gnet import make_calculator

        super().__init__(**kwargs)
        self.inner = make_calculator(model)
        self.implemented_properties = list(self.inner.implemented_properties)
        self._gate = _Gate()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        self._gate.wait_if_due()
        super().calculate(atoms, properties, system_changes)
        self.inner.calculate(self.atoms.copy(), properties, system_changes)
        self.results = dict(self.inner.results)
