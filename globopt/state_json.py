"""The search state as JSON text, written with every proposal and result (archive.py).

A GA's state is mostly its population, which changes only when a result enters it, yet the state is
written two or more times per relaxation: encoding the same members again was about half of the cost of
each write. A search may hand such a part over as a ``PreEncodedList``, a plain list (so ``json.dumps``
of the state still works everywhere) that carries its own JSON text; ``encode_state`` uses that text
instead of encoding the list again. The result is the same text ``json.dumps`` would give.
"""

from __future__ import annotations

import json
from typing import Any

SEPARATORS = (",", ":")


class PreEncodedList(list):
    """A list of JSON values that carries their encoding (``json.dumps(items, separators=SEPARATORS)``)."""

    def __init__(self, items: list[Any], text: str | None = None) -> None:
        super().__init__(items)
        self.json_text = json.dumps(items, separators=SEPARATORS) if text is None else text


def encode_state(state: dict[str, Any]) -> str:
    """``json.dumps(state, separators=SEPARATORS)``, reusing the text of top-level PreEncodedLists."""
    if not any(isinstance(value, PreEncodedList) for value in state.values()):
        return json.dumps(state, separators=SEPARATORS)
    parts = []
    for key, value in state.items():
        text = (
            value.json_text if isinstance(value, PreEncodedList) else json.dumps(value, separators=SEPARATORS)
        )
        parts.append(f"{json.dumps(str(key))}:{text}")
    return "{" + ",".join(parts) + "}"
