"""The periodic, permutation-equivariant message-passing backbone shared by the diffusion denoiser, the
WGAN generator and the WGAN critic.

Every atom exchanges messages with every atom of the same cell (itself included: its periodic images
matter). A message depends on the two atoms' states, the lattice, a conditioning vector (diffusion time
or GAN noise) and Fourier features sin/cos(2 pi k d) of the fractional coordinate difference d. Those
features are periodic in d and depend only on differences, so the model cannot tell a structure from its
lattice-translated copy; messages are averaged over the other atoms, so atom order is irrelevant. This is
the design of DiffCSP's CSPNet, written compactly for a padded dense batch (cells of at most a few dozen
atoms, where all pairs are cheaper than building neighbour lists).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from generators.representation import ELEMENT_DESCRIPTORS, MAX_Z


def mlp(sizes: list[int], final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def sinusoidal_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] values in [0, 1] -> [B, dim] sin/cos features over geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=values.device) / max(half - 1, 1))
    angles = values[:, None] * 1000.0 * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class AtomEmbedding(nn.Module):
    """Element -> vector: physical descriptors through a linear map plus a learned per-element offset
    (zero-initialised, so an element unseen in training falls back to its descriptors)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.register_buffer("descriptors", ELEMENT_DESCRIPTORS.clone(), persistent=False)
        self.from_descriptors = nn.Linear(ELEMENT_DESCRIPTORS.shape[1], hidden)
        self.learned = nn.Embedding(MAX_Z + 1, hidden)
        nn.init.zeros_(self.learned.weight)

    def forward(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.from_descriptors(self.descriptors[numbers]) + self.learned(numbers)


class PeriodicLayer(nn.Module):
    def __init__(self, hidden: int, n_freq: int) -> None:
        super().__init__()
        self.edge = mlp([2 * hidden + hidden + 6 * n_freq, hidden, hidden], final_activation=True)
        self.node = mlp([2 * hidden, hidden, hidden])
        self.norm = nn.LayerNorm(hidden)

    def forward(
        self, h: torch.Tensor, lattice_h: torch.Tensor, fourier: torch.Tensor, pair_mask: torch.Tensor
    ) -> torch.Tensor:
        width = h.shape[-1]
        h_norm = self.norm(h)
        # The first edge layer is linear in the concatenation [h_i, h_j, lattice, fourier_ij]; applying
        # its column blocks per atom and per crystal before broadcasting to pairs gives the same result
        # with a fraction of the work (only the Fourier block is per pair).
        first = self.edge[0]
        w_i, w_j, w_l, w_f = torch.split(first.weight, [width, width, width, fourier.shape[-1]], dim=1)
        per_i = h_norm @ w_i.T
        per_j = h_norm @ w_j.T
        per_crystal = lattice_h @ w_l.T + first.bias
        pre = per_i[:, :, None, :] + per_j[:, None, :, :] + per_crystal[:, None, None, :] + fourier @ w_f.T
        messages = self.edge[2:](self.edge[1](pre)) * pair_mask[..., None]
        aggregated = messages.sum(dim=2) / pair_mask.sum(dim=2, keepdim=True).clamp(min=1)
        return h + self.node(torch.cat([h_norm, aggregated], dim=-1))


class PeriodicBackbone(nn.Module):
    """Atoms + fractional coordinates + standardised lattice + conditioning vector -> per-atom outputs
    (``node_out`` numbers each) and per-crystal outputs (``graph_out`` numbers)."""

    def __init__(
        self, hidden: int, layers: int, n_freq: int, cond_dim: int, node_out: int, graph_out: int
    ) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.atoms = AtomEmbedding(hidden)
        self.cond = mlp([cond_dim, hidden, hidden])
        self.lattice = mlp([6 + hidden, hidden, hidden])
        self.layers = nn.ModuleList(PeriodicLayer(hidden, n_freq) for _ in range(layers))
        self.node_head = mlp([hidden, hidden, node_out]) if node_out else None
        self.graph_head = mlp([hidden + hidden, hidden, graph_out]) if graph_out else None

    def forward(
        self,
        numbers: torch.Tensor,
        mask: torch.Tensor,
        frac: torch.Tensor,
        lattice: torch.Tensor,
        cond: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        maskf = mask.to(frac.dtype)
        cond_h = self.cond(cond)
        h = self.atoms(numbers) + cond_h[:, None, :]
        lattice_h = self.lattice(torch.cat([lattice, cond_h], dim=-1))
        diff = frac[:, None, :, :] - frac[:, :, None, :]  # [B, N, N, 3]: x_j - x_i
        k = torch.arange(1, self.n_freq + 1, device=frac.device, dtype=frac.dtype)
        angles = 2 * math.pi * diff[..., None] * k  # [B, N, N, 3, K]
        fourier = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)
        pair_mask = maskf[:, :, None] * maskf[:, None, :]
        for layer in self.layers:
            h = layer(h, lattice_h, fourier, pair_mask)
        node = self.node_head(h) * maskf[..., None] if self.node_head is not None else None
        graph = None
        if self.graph_head is not None:
            pooled = (h * maskf[..., None]).sum(1) / maskf.sum(1, keepdim=True).clamp(min=1)
            graph = self.graph_head(torch.cat([pooled, lattice_h], dim=-1))
        return node, graph
