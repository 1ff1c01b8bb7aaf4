"""Parsing and checking the composition a search is asked to solve.

Users write formulas (``Na4Cl4``) or mappings (``{Na: 4, Cl: 4}``); the engine needs an ordered
element -> integer-count mapping for the conventional cell it will build. Errors are raised as
``ValueError`` with a message a user can act on; the config layer attaches the key name.
"""

from __future__ import annotations

from collections.abc import Mapping

from pymatgen.core import Composition, Element

# Random symmetric structures of more atoms than this are practically never relaxed to a ground state
# within any budget a user would pay for; larger cells belong to templates or HTVS, not to ab initio search.
MAX_ATOMS = 200


def parse_composition(value: str | Mapping[str, object]) -> dict[str, int]:
    """Return {element symbol: atom count} in the order given, or raise ValueError saying what is wrong."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("empty formula; expected e.g. 'Na4Cl4' or a mapping {Na: 4, Cl: 4}")
        _check_symbols_in_formula(text)
        try:
            parsed = Composition(text)
        except Exception as exc:  # pymatgen raises several types for malformed formulas
            raise ValueError(f"cannot parse formula {text!r} ({exc}); expected e.g. 'Na4Cl4'") from exc
        items = [(str(el), amount) for el, amount in parsed.items()]
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise ValueError(
            f"expected a formula string or an element -> count mapping, got {type(value).__name__}"
        )

    counts: dict[str, int] = {}
    for symbol, amount in items:
        symbol = str(symbol)
        if not Element.is_valid_symbol(symbol):
            raise ValueError(f"{symbol!r} is not a chemical element symbol (expected e.g. Na, Cl, Ti, O)")
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise ValueError(f"count of {symbol} must be a positive integer, got {amount!r}")
        if amount <= 0 or abs(amount - round(amount)) > 1e-8:
            raise ValueError(
                f"count of {symbol} must be a positive integer number of atoms in the cell, got {amount!r}"
            )
        counts[symbol] = counts.get(symbol, 0) + round(amount)
    if not counts:
        raise ValueError("composition has no elements")
    total = sum(counts.values())
    if total > MAX_ATOMS:
        raise ValueError(f"{total} atoms per cell is more than the {MAX_ATOMS} a search can handle")
    return counts


def _check_symbols_in_formula(text: str) -> None:
    """pymatgen accepts some junk silently (e.g. lower-case runs); name unknown symbols clearly instead."""
    import re

    for symbol in re.findall(r"[A-Z][a-z]*", text):
        if not Element.is_valid_symbol(symbol):
            raise ValueError(f"{symbol!r} in formula {text!r} is not a chemical element symbol")
    # pymatgen drops an element written with count 0 (Cu0Au2 reads as Au2): name it instead
    for symbol, count in re.findall(r"([A-Z][a-z]*)\s*(\d*\.?\d+)", text):
        if float(count) == 0:
            raise ValueError(
                f"count of {symbol} is {count} in formula {text!r}; every element needs a positive count "
                f"(remove {symbol} to search without it)"
            )
    if re.search(r"[^A-Za-z0-9.()\s]", text) or re.match(r"^[a-z]", text):
        raise ValueError(
            f"cannot parse formula {text!r}; expected element symbols with counts, e.g. 'Na4Cl4'"
        )


def formula_string(counts: Mapping[str, int]) -> str:
    """Compact formula in the user's element order, e.g. Na4Cl4 (not reduced: the cell content matters)."""
    return "".join(f"{el}{n if n != 1 else ''}" for el, n in counts.items())


def cell_contents(
    composition: Mapping[str, int], formula_units: tuple[int, int] | None
) -> list[dict[str, int]]:
    """Cell contents a search may build: the composition itself, or n x formula unit for n in the range."""
    if formula_units is None:
        return [dict(composition)]
    low, high = formula_units
    return [{el: n * count for el, count in composition.items()} for n in range(low, high + 1)]


def is_reduced(composition: Mapping[str, int]) -> bool:
    from math import gcd

    divisor = 0
    for count in composition.values():
        divisor = gcd(divisor, count)
    return divisor == 1
