"""The crystal representation shared by the diffusion model and the WGAN.

A crystal is (atom types, fractional coordinates, lattice). Choices, and why:

* Fractional coordinates live on the 3-torus [0, 1)^3, so noise on them is wrapped (mod 1) and every
  network feature of them is periodic (Fourier features of coordinate differences): a structure and its
  copy shifted by a lattice vector, or with the origin moved, look identical to the model.
* Atoms are an unordered set: the network aggregates over all pairs with a mean, so permuting the atoms
  permutes the per-atom outputs and leaves the lattice output unchanged.
* The lattice is the 6 Niggli-reduced cell parameters (a, b, c, alpha, beta, gamma): invariant to
  rotations of the crystal, unlike a lattice matrix. Lengths are divided by N^(1/3) (N atoms) so cells of
  different sizes share one scale, then logged and standardised with the training set's mean and spread.
* Atom types are conditioning, never generated (the crystal-structure-prediction task: the formula and
  number of atoms are given). Each element is described by physical descriptors (period, group,
  electronegativity, covalent radius) plus a learned per-element embedding, so an element missing from
  the training data still gets a meaningful description.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase.data import covalent_radii
from pymatgen.core import Element, Lattice, Structure

MAX_Z = 100
# Floors of the lattice standardisation spread: a data set of cubic cells has zero spread in the angles,
# and dividing noise by zero would make the model's lattice meaningless.
MIN_LOG_LENGTH_STD = 0.02
MIN_ANGLE_STD = 2.0  # degrees


def _element_descriptors() -> np.ndarray:
    """[MAX_Z + 1, 28]: one-hot period (7), one-hot group (18), Pauling electronegativity, covalent
    radius, Z/100 (row 0 unused)."""
    table = np.zeros((MAX_Z + 1, 28), dtype=np.float32)
    for z in range(1, MAX_Z + 1):
        element = Element.from_Z(z)
        table[z, element.row - 1] = 1.0
        table[z, 7 + element.group - 1] = 1.0
        with warnings.catch_warnings():  # noble gases have no Pauling electronegativity (NaN, zeroed below)
            warnings.simplefilter("ignore")
            x = element.X
        table[z, 25] = 0.0 if x is None or not np.isfinite(x) else x / 4.0
        table[z, 26] = covalent_radii[z] / 2.0
        table[z, 27] = z / 100.0
    return table


ELEMENT_DESCRIPTORS = torch.from_numpy(_element_descriptors())


@dataclass(frozen=True)
class LatticeScaler:
    """Standardises (log of N^(-1/3)-scaled lengths, angles in degrees) with the training set's statistics."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, params: np.ndarray, n_atoms: np.ndarray) -> LatticeScaler:
        raw = _raw_lattice_features(params, n_atoms)
        std = raw.std(axis=0)
        std[:3] = np.maximum(std[:3], MIN_LOG_LENGTH_STD)
        std[3:] = np.maximum(std[3:], MIN_ANGLE_STD)
        return cls(tuple(float(v) for v in raw.mean(axis=0)), tuple(float(v) for v in std))

    def encode(self, params: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
        return ((_raw_lattice_features(params, n_atoms) - np.array(self.mean)) / np.array(self.std)).astype(
            np.float32
        )

    def decode(self, features: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
        """Back to (a, b, c, alpha, beta, gamma) in Å and degrees; angles clipped to (30, 150)."""
        raw = np.asarray(features, dtype=np.float64) * np.array(self.std) + np.array(self.mean)
        scale = np.cbrt(np.asarray(n_atoms, dtype=np.float64))[:, None]
        lengths = np.exp(raw[:, :3]) * scale
        angles = np.clip(raw[:, 3:], 30.0, 150.0)
        return np.concatenate([lengths, angles], axis=1)


def _raw_lattice_features(params: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    params = np.asarray(params, dtype=np.float64)
    scale = np.cbrt(np.asarray(n_atoms, dtype=np.float64))[:, None]
    return np.concatenate([np.log(params[:, :3] / scale), params[:, 3:]], axis=1)


@dataclass
class Crystal:
    """One crystal in the model's terms: atomic numbers, fractional coordinates in [0, 1), 6 cell params."""

    numbers: np.ndarray  # [N] int
    frac: np.ndarray  # [N, 3]
    params: np.ndarray  # [6]: a, b, c (Å), alpha, beta, gamma (degrees)

    @classmethod
    def from_structure(cls, structure: Structure) -> Crystal:
        """Niggli-reduce (a canonical cell, so equal crystals get equal lattice parameters) and wrap."""
        if not structure.is_ordered:
            raise ValueError(f"{structure.composition.formula}: disordered structures are not supported")
        reduced = structure.get_reduced_structure()
        lattice = reduced.lattice
        return cls(
            numbers=np.array([site.specie.Z for site in reduced], dtype=np.int64),
            frac=np.mod(reduced.frac_coords, 1.0),
            params=np.array([*lattice.abc, *lattice.angles], dtype=np.float64),
        )

    def to_structure(self) -> Structure:
        lattice = Lattice.from_parameters(*self.params)
        return Structure(lattice, [int(z) for z in self.numbers], np.mod(self.frac, 1.0))


@dataclass
class CrystalBatch:
    """Crystals padded to a common atom count; ``mask`` marks real atoms."""

    numbers: torch.Tensor  # [B, N] long, 0 for padding
    frac: torch.Tensor  # [B, N, 3]
    lattice: torch.Tensor  # [B, 6] standardised
    mask: torch.Tensor  # [B, N] bool
    n_atoms: torch.Tensor  # [B] long

    @classmethod
    def collate(cls, crystals: Sequence[Crystal], scaler: LatticeScaler) -> CrystalBatch:
        n_atoms = np.array([len(c.numbers) for c in crystals])
        width = int(n_atoms.max())
        numbers = np.zeros((len(crystals), width), dtype=np.int64)
        frac = np.zeros((len(crystals), width, 3), dtype=np.float32)
        for i, crystal in enumerate(crystals):
            numbers[i, : n_atoms[i]] = crystal.numbers
            frac[i, : n_atoms[i]] = crystal.frac
        params = np.stack([c.params for c in crystals])
        return cls(
            numbers=torch.from_numpy(numbers),
            frac=torch.from_numpy(frac),
            lattice=torch.from_numpy(scaler.encode(params, n_atoms)),
            mask=torch.from_numpy(numbers > 0),
            n_atoms=torch.from_numpy(n_atoms),
        )

    @classmethod
    def for_compositions(cls, species: Sequence[Sequence[int]]) -> CrystalBatch:
        """Conditioning only (atom types); coordinates and lattice are zeros, to be generated."""
        n_atoms = np.array([len(s) for s in species])
        width = int(n_atoms.max())
        numbers = np.zeros((len(species), width), dtype=np.int64)
        for i, s in enumerate(species):
            numbers[i, : len(s)] = s
        return cls(
            numbers=torch.from_numpy(numbers),
            frac=torch.zeros(len(species), width, 3),
            lattice=torch.zeros(len(species), 6),
            mask=torch.from_numpy(numbers > 0),
            n_atoms=torch.from_numpy(n_atoms),
        )

    def crystals(self, scaler: LatticeScaler) -> list[Crystal]:
        """Undo collate: generated coordinates and standardised lattice back to Crystals."""
        n_atoms = self.n_atoms.numpy()
        params = scaler.decode(self.lattice.detach().double().numpy(), n_atoms)
        frac = self.frac.detach().double().numpy()
        numbers = self.numbers.numpy()
        return [
            Crystal(numbers[i, : n_atoms[i]].copy(), np.mod(frac[i, : n_atoms[i]], 1.0), params[i])
            for i in range(len(n_atoms))
        ]


def wrap(frac: torch.Tensor) -> torch.Tensor:
    """Fractional coordinates back into [0, 1)."""
    return torch.remainder(frac, 1.0)


def wrapped_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Shortest displacement a - b on the torus, in (-0.5, 0.5]."""
    d = a - b
    return d - torch.round(d)
