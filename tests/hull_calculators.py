"""A test calculator for kill tests: EMT that kills its own process at a chosen potential call.

``$GLOBOPT_TEST_KILL_AT=N`` makes the N-th energy evaluation of the process SIGKILL it, so a test can kill a
run at exactly the same point every time instead of racing the clock; without the variable it is EMT.
"""

from __future__ import annotations

import os
import signal

from ase.calculators.emt import EMT


class KillingEMT(EMT):
    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        kill_at = os.environ.get("GLOBOPT_TEST_KILL_AT")
        if kill_at:
            KillingEMT.calls = getattr(KillingEMT, "calls", 0) + 1
            if KillingEMT.calls == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
        if system_changes is None:
            return super().calculate(atoms, properties)
        return super().calculate(atoms, properties, system_changes)
