"""Variable-composition search: the convex hull of a whole chemical system in one run.

``settings`` holds the config keys (``chemical_system``, ``atoms`` and the ``hull:`` section), ``space`` the
cell contents a run may build, ``tracker`` the running hull the search's fitness comes from (part of the
search state), ``starts`` the structures relaxed before the search proper (elemental references, competing
phases), ``analysis`` and ``output`` what the user gets (hull.csv, stable/, hull.png, status lines). The
searches themselves live in ``globopt/search/`` (variable_ga.py, variable_random.py).
"""
