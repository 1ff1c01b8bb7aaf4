"""Search algorithms: they propose candidates and learn from results; they never call the potential.

``base`` is the contract with the engine, ``factory`` builds the algorithm a config names; ``random_search``,
``ga`` (with the crystal ``operators`` on ``cells``) and ``pso`` (with ``structure_difference``) are the
algorithms; ``pyxtal_sampling`` and ``random_stream`` make the random symmetric structures they all start
from.
"""
