"""High-throughput virtual screening: substitute elements into template structures, relax, rank by stability.

The screen is an ordinary globopt run (``mode: htvs``): the enumeration is a search algorithm that streams
proposals (``enumeration.py``, ``search.py``), the engine relaxes them like any candidate, and at the end the
convex hull (``hull.py``) ranks them and ``output.py`` writes ``ranked.csv``, ``stable/`` and hull plots.
Nothing here is imported by the engine unless a run is in htvs mode.
"""
