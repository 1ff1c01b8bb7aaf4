"""M3GNet embedding of an *unrelaxed* structure as a surrogate descriptor.

One forward pass of the run's M3GNet potential (no forces, no stress, no relaxation) yields two things that
may say more about the relaxed enthalpy than a hand-made fingerprint:

* the final atom features (the 64-dimensional node features after the last graph block, i.e. the input of
  the per-atom energy read-out), which the network learned to encode each atom's chemical environment
  with. They are averaged per element of the run (elements ordered by atomic number, one block each;
  zeros for an element absent from the structure), so the vector is composition-aware and invariant to
  permutation, supercell and rotation (M3GNet uses distances and angles only);
* the single-point energy per atom of the unrelaxed structure, which the same network was trained to
  predict. It is appended ``energy_weight`` times: the GP standardises every column and uses one length
  scale for all of them, so a column's share of the distance is its multiplicity.

The potential is loaded through :func:`surrogates.m3gnet.load_potential` (so DGL-era checkpoints get the
aggregation fix) once per process, and then deep-copied: ``M3GNet.forward`` writes ``feature_dict`` on the
module, and a relaxation running on the shared instance in another thread must not overwrite it between
this forward pass and the read. torch and matgl are imported lazily, as in surrogates/m3gnet.py.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from ase.data import atomic_numbers
from pymatgen.core import Structure

from surrogates.m3gnet import DEFAULT_MODEL

# Final atom features are float32; rounding to 1e-5 (well above float32 noise on O(1) values) makes a
# structure read back from the archive (JSON) give the same vector as in the running engine, which the GP
# rebuilt on resume relies on (see gp.py).
DECIMALS = 5


@dataclass(frozen=True)
class M3GNetOutput:
    """What one forward pass gives: per-atom final features and the single-point energy per atom."""

    atom_features: np.ndarray  # (n_atoms, n_features), float32
    species: tuple[str, ...]
    energy_per_atom: float  # eV/atom, unrelaxed


class _Network:
    """A private copy of the potential and its graph converter, used under a lock (see module doc)."""

    def __init__(self, model: str) -> None:
        from matgl.ext.pymatgen import Structure2Graph
        from matgl.models import M3GNet

        from surrogates.m3gnet import load_potential

        shared, self.info = load_potential(model, "cpu")
        if not isinstance(shared.model, M3GNet):
            raise ValueError(
                f"the m3gnet descriptors need an M3GNet model; {model} is a {type(shared.model).__name__}"
            )
        # The shared network keeps the intermediate features of its last forward pass (``feature_dict``);
        # after a relaxation in this process they are non-leaf tensors, which torch refuses to deep-copy.
        # The copy starts without them.
        leftover = getattr(shared.model, "feature_dict", None)
        memo = {} if leftover is None else {id(leftover): {}}
        self.potential = copy.deepcopy(shared, memo).eval()
        net = self.potential.model
        self.converter = Structure2Graph(element_types=net.element_types, cutoff=net.cutoff)
        self.lock = threading.Lock()

    def __call__(self, structure: Structure) -> M3GNetOutput:
        import torch

        net = self.potential.model
        with self.lock, torch.no_grad():
            before = torch.get_num_threads()
            torch.set_num_threads(1)  # rank 0 must not compete with the relaxing workers for cores
            try:
                graph, lattice, state = self.converter.get_graph(structure)
                graph.pbc_offshift = graph.pbc_offset @ lattice[0]
                graph.pos = graph.frac_coords @ lattice[0]
                state_attr = torch.as_tensor(np.asarray(state), dtype=lattice.dtype)
                raw = net(g=graph, state_attr=state_attr)
                features = net.feature_dict[f"gc_{net.n_blocks}"]["node_feat"].detach().numpy().copy()
                energy = self.potential.data_std * raw + self.potential.data_mean
                if self.potential.element_refs is not None:
                    energy = energy + torch.squeeze(self.potential.element_refs(graph))
            finally:
                torch.set_num_threads(before)
        species = tuple(site.specie.symbol for site in structure)
        return M3GNetOutput(features, species, float(energy) / len(structure))


@cache
def _network(model: str) -> _Network:
    return _Network(model)


def m3gnet_output(structure: Structure, model: str = DEFAULT_MODEL) -> M3GNetOutput:
    """One forward pass of ``model`` on ``structure`` (the network is built once per process and model)."""
    return _network(model)(structure)


@dataclass(frozen=True)
class M3GNetDescriptor:
    """Per-element mean of M3GNet's final atom features, then the single-point energy per atom.

    ``features=False`` gives the single-point energy alone, ``energy_weight=0`` the embedding alone.
    """

    elements: tuple[str, ...]
    model: str = DEFAULT_MODEL
    features: bool = True
    energy_weight: int = 1
    n_features: int = 64  # M3GNet's node feature width (checked at the first call)

    def __post_init__(self) -> None:
        if not self.elements:
            raise ValueError("M3GNetDescriptor needs at least one element")
        unknown = [el for el in self.elements if el not in atomic_numbers]
        if unknown:
            raise ValueError(f"unknown element symbol(s) {unknown}")
        if self.energy_weight < 0 or (not self.features and self.energy_weight == 0):
            raise ValueError("energy_weight must be >= 0, and > 0 when features are off")

    @property
    def ordered(self) -> list[str]:
        return sorted(set(self.elements), key=lambda el: atomic_numbers[el])

    @property
    def size(self) -> int:
        return (len(self.ordered) * self.n_features if self.features else 0) + self.energy_weight

    def from_output(self, output: M3GNetOutput) -> np.ndarray:
        """The descriptor from a forward pass already made (the benchmark shares one pass among variants)."""
        stray = sorted(set(output.species) - set(self.elements))
        if stray:
            raise ValueError(f"structure contains {stray}, not among the descriptor elements {self.elements}")
        parts: list[Any] = []
        if self.features:
            if output.atom_features.shape[1] != self.n_features:
                raise ValueError(
                    f"model {self.model} has {output.atom_features.shape[1]} atom features, "
                    f"expected {self.n_features}"
                )
            species = np.array(output.species)
            for element in self.ordered:
                mask = species == element
                block = output.atom_features[mask].mean(axis=0) if mask.any() else np.zeros(self.n_features)
                parts.append(block)
        parts.append(np.full(self.energy_weight, output.energy_per_atom))
        return np.round(np.concatenate(parts).astype(np.float64), DECIMALS)

    def __call__(self, structure: Structure) -> np.ndarray:
        """The descriptor vector (float64, length ``size``): one forward pass of the model."""
        return self.from_output(m3gnet_output(structure, self.model))

    def many(self, structures: Iterable[Structure]) -> np.ndarray:
        rows = [self(s) for s in structures]
        return np.vstack(rows) if rows else np.zeros((0, self.size))
