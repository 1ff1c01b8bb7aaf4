"""The worker side of the evaluator pipeline: relax one candidate with a potential and analyse the result.

``evaluate`` (the entry point every scheduler backend calls), ``relax`` (optimiser loop and failure
guards), ``cell_filter`` (the variable-cell filter), ``early_stop`` and ``known_minima`` (ways to end a
relaxation before it converges). Nothing here knows the search, the archive or the run directory.
"""
