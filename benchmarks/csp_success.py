"""Thin wrapper kept for old commands: `globopt benchmark` on benchmarks/suites/standard.yaml.

    GLOBOPT_MODELS=../shared/models .venv/bin/python benchmarks/csp_success.py \\
        --structures NaCl TiO2 GaN --modes random ga pso --seeds 0 1 2 --budget 40

takes the options of `globopt benchmark` (see `globopt benchmark --help`); the harness lives in
globopt/scoreboard/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from globopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", str(Path(__file__).parent / "suites" / "standard.yaml"), *sys.argv[1:]]))
