"""Descriptors of an *unrelaxed* structure that the surrogate uses to predict its *relaxed* enthalpy.

A relaxation moves atoms by a fraction of an ångström and rescales the cell by some per cent, so what
survives it is the local environment: which element sits next to which, and at roughly what distance.
The default descriptor is therefore a set of element-pair radial distribution functions (partial RDFs),
Gaussian-smeared so that small displacements change the vector smoothly (a GP with a stationary kernel
needs that), plus the volume per atom. It is

* invariant to translation, rotation, permutation of like atoms and the choice of supercell
  (counts are normalised per atom in the cell), so symmetry-equivalent proposals look the same;
* composition-aware (one block per unordered element pair of the run's elements), so a formula-unit
  range or a GA permutation move that swaps species changes the vector;
* cheap: one periodic pair list per structure (``globopt.geometry.periodic_pairs``, well under a
  millisecond for 8 atoms), computed on the master for every proposal.

Alternatives (surrogates/m3gnet_descriptor.py): ``m3gnet`` = per-element mean of M3GNet's final atom
features plus the single-point energy per atom, ``m3gnet_embedding`` (features only), ``m3gnet_energy``
(energy only). benchmarks/surrogate_descriptors.py compared them held-out on ~200 relaxed candidates per
composition (GaN, ZnO, TiO2, SrTiO3; random, GA and PSO searches): with the same GP, ``m3gnet`` had a 2-7%
lower MAE in all four and a higher Spearman rank correlation in three, but pooled the MAE gain is
0.019 eV/atom with a 95% interval of [-0.039, +0.002] (not significant), while it costs 10-15x more per
proposal on the master (17 vs 1.6 ms for 6 atoms, 81 vs 19 ms for 48, one thread) and a model load there.
The single-point energy alone is much worse than either (its Spearman 0.4-0.6). So ``rdf`` stays the
default; ``m3gnet`` is there for runs with few workers, where its cost does not matter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from ase.data import atomic_numbers, chemical_symbols
from pymatgen.core import Structure

from globopt.geometry import periodic_pairs

# "m3gnet*" are in surrogates/m3gnet_descriptor.py: one forward pass of the run's M3GNet potential each
# multiplicity of the single-point energy column in "m3gnet" (see surrogates/m3gnet_descriptor.py); 1, 8
# and 32 gave the same held-out accuracy (benchmarks/surrogate_descriptors.py), so the plain column
M3GNET_ENERGY_WEIGHT = 1
DESCRIPTORS = ("rdf", "m3gnet", "m3gnet_embedding", "m3gnet_energy")


@dataclass(frozen=True)
class PairRDFDescriptor:
    """Smeared partial RDFs for every element pair of ``elements`` up to ``cutoff``, then volume/atom.

    ``sigma`` is the Gaussian width in Å: wide enough that a bond shortened by a relaxation still
    overlaps the bin it occupied before, narrow enough that first and second shells stay apart.
    """

    elements: tuple[str, ...]
    cutoff: float = 6.0
    n_bins: int = 30
    sigma: float = 0.25

    def __post_init__(self) -> None:
        if not self.elements:
            raise ValueError("PairRDFDescriptor needs at least one element")
        unknown = [el for el in self.elements if el not in atomic_numbers]
        if unknown:
            raise ValueError(f"unknown element symbol(s) {unknown}")
        if self.cutoff <= 0 or self.n_bins < 2 or self.sigma <= 0:
            raise ValueError("cutoff and sigma must be positive and n_bins >= 2")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        ordered = sorted(set(self.elements), key=lambda el: atomic_numbers[el])
        return [(a, b) for i, a in enumerate(ordered) for b in ordered[i:]]

    @property
    def size(self) -> int:
        return len(self.pairs) * self.n_bins + 1

    @property
    def centres(self) -> np.ndarray:
        return np.linspace(0.5, self.cutoff, self.n_bins)

    def __call__(self, structure: Structure) -> np.ndarray:
        """The descriptor vector (float64, length ``size``)."""
        numbers = np.array([site.specie.Z for site in structure])
        n_atoms = len(numbers)
        symbols = np.array([chemical_symbols[z] for z in numbers])
        stray = sorted(set(symbols) - set(self.elements))
        if stray:
            raise ValueError(f"structure contains {stray}, not among the descriptor elements {self.elements}")
        # a Gaussian tail of 3 sigma past the cutoff keeps the last bin smooth as neighbours cross it
        reach = self.cutoff + 3 * self.sigma
        i, j, _, d = periodic_pairs(structure.lattice.matrix, structure.frac_coords, reach)
        centres = self.centres
        blocks = []
        for a, b in self.pairs:
            # each unordered pair once: i of type a, j of type b (a == b counts every bond twice, as i-j and
            # j-i, which is fine: it is the same normalisation for every structure)
            mask = (symbols[i] == a) & (symbols[j] == b)
            if a != b:
                mask |= (symbols[i] == b) & (symbols[j] == a)
            distances = d[mask]
            smeared = np.exp(-0.5 * ((distances[:, None] - centres[None, :]) / self.sigma) ** 2).sum(axis=0)
            # divide by r^2 so distant shells (which hold more neighbours) do not dominate the vector
            blocks.append(smeared / (n_atoms * centres**2))
        volume = structure.volume / n_atoms
        # rounded so that a structure read back from the archive (JSON) gives the identical vector: the GP
        # rebuilt on resume must see exactly the numbers the running engine saw
        return np.round(np.concatenate([*blocks, [volume]]), 9).astype(np.float64)

    def many(self, structures: Iterable[Structure]) -> np.ndarray:
        rows = [self(s) for s in structures]
        return np.vstack(rows) if rows else np.zeros((0, self.size))


def make_descriptor(
    kind: str, elements: Iterable[str], model: str | None = None
) -> Callable[[Structure], np.ndarray]:
    """The descriptor called ``kind`` for a run over ``elements``.

    ``model`` is the run's matgl model (name or folder) for the M3GNet descriptors; None means the default
    model (e.g. a test run whose relaxations use EMT still describes structures with M3GNet).
    """
    elements = tuple(elements)
    if kind == "rdf":
        return PairRDFDescriptor(elements)
    if kind in DESCRIPTORS:
        from surrogates.m3gnet import DEFAULT_MODEL
        from surrogates.m3gnet_descriptor import M3GNetDescriptor

        weight = {"m3gnet": M3GNET_ENERGY_WEIGHT, "m3gnet_embedding": 0, "m3gnet_energy": 1}[kind]
        return M3GNetDescriptor(
            elements, model or DEFAULT_MODEL, features=kind != "m3gnet_energy", energy_weight=weight
        )
    raise ValueError(f"unknown descriptor {kind!r}; available: {', '.join(DESCRIPTORS)}")
