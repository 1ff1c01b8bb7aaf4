"""Sampling structures of a given composition from a trained generator checkpoint.

Sampling is a pure function of (checkpoint, compositions, seed): every batch gets its own torch
generator seeded from (seed, batch index), so the same call returns the same structures. The search
relies on that for resume-exact seeding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from pymatgen.core import Composition, Element, Structure

from generators.checkpoint import GeneratorCheckpoint, load_checkpoint
from generators.representation import MAX_Z, Crystal, CrystalBatch

log = logging.getLogger("globopt.generators")


class StructureGenerator:
    """A loaded checkpoint ready to sample: ``generate([["Na"]*4 + ["Cl"]*4], seed=0)``."""

    def __init__(self, checkpoint: str | Path | GeneratorCheckpoint) -> None:
        self.checkpoint = (
            checkpoint if isinstance(checkpoint, GeneratorCheckpoint) else load_checkpoint(checkpoint)
        )
        self.model = self.checkpoint.build_model()
        self.kind = self.checkpoint.kind
        self._warned: set[str] = set()

    def generate(
        self,
        species: Sequence[Sequence[str | int]],
        seed: int = 0,
        batch_size: int = 256,
        steps: int | None = None,
    ) -> list[Structure]:
        """One structure per entry of ``species`` (each a list of element symbols or numbers, one per atom).

        ``steps``: reverse-diffusion steps (diffusion only; default the training schedule's)."""
        numbers = [[_atomic_number(s) for s in entry] for entry in species]
        _check_representable(numbers)
        self._warn_unseen(numbers)
        crystals: list[Crystal] = []
        for index, start in enumerate(range(0, len(numbers), batch_size)):
            chunk = numbers[start : start + batch_size]
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
            batch = CrystalBatch.for_compositions(chunk)
            with torch.no_grad():
                if self.kind == "diffusion":
                    generated = self.model.sample(batch, generator, steps=steps)
                else:
                    generated = self.model.sample(batch, generator)
            crystals.extend(generated.crystals(self.checkpoint.scaler))
        return [_to_structure(c) for c in crystals]

    def generate_composition(
        self, composition: str | dict[str, int], n: int, seed: int = 0, steps: int | None = None
    ) -> list[Structure]:
        """``n`` structures of one cell content, e.g. ``generate_composition("Na4Cl4", 32)``."""
        comp = Composition(composition)
        species: list[str] = []
        for element, amount in comp.get_el_amt_dict().items():
            if abs(amount - round(amount)) > 1e-6 or amount < 1:
                raise ValueError(f"composition {composition!r}: atom counts must be whole numbers")
            species.extend([element] * round(amount))
        return self.generate([species] * n, seed=seed, steps=steps)

    def _warn_unseen(self, numbers: list[list[int]]) -> None:
        seen = set(self.checkpoint.vocabulary)
        for entry in numbers:
            for z in entry:
                symbol = Element.from_Z(z).symbol
                if symbol not in seen and symbol not in self._warned:
                    self._warned.add(symbol)
                    log.warning(
                        "element %s was not in the generator's training data (%s); it is described by its "
                        "physical descriptors only, expect less reliable structures",
                        symbol, self.checkpoint.dataset.get("path", "unknown data set"),
                    )  # fmt: skip


def _atomic_number(value: str | int) -> int:
    if isinstance(value, int):
        if not 1 <= value <= 100:
            raise ValueError(f"atomic number {value} outside 1..100")
        return value
    try:
        return Element(str(value)).Z
    except ValueError:
        raise ValueError(f"{value!r} is not an element symbol") from None


def _to_structure(crystal: Crystal) -> Structure:
    return crystal.to_structure()


def _check_representable(numbers: list[list[int]]) -> None:
    """The models describe elements by a table of Z = 1..MAX_Z: name an element outside it."""
    outside = sorted({z for entry in numbers for z in entry if not 1 <= z <= MAX_Z})
    if outside:
        names = ", ".join(
            f"{Element.from_Z(z).symbol} (Z={z})" if 1 <= z <= 118 else f"Z={z}" for z in outside
        )
        raise ValueError(
            f"element(s) {names} cannot be generated: the generators describe elements up to Z={MAX_Z} "
            f"({Element.from_Z(MAX_Z).symbol})"
        )
