"""CSP benchmark harness: known structures, searched at a fixed budget, success rate against the reference.

`globopt benchmark SUITE.yaml` = load the suite (suite.py) -> relax every known structure and listed
polymorph with the same potential (reference.py) -> run each (structure, mode, seed) through the normal
engine into its own run directory (runner.py; ase-ga in ase_ga_baseline.py) -> hit detection and
summary tables (results.py).
"""
