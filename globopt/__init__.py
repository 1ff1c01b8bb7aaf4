"""globopt: crystal-structure discovery engine (search, evaluator pipeline, run directory, CLI)."""

import os as _os

# OpenBLAS threads fight torch's own for the cores and make relaxations 2-3x slower; this must be set
# before numpy is first imported, which for the CLI and for worker processes happens after this line.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
