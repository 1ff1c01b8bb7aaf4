"""WGAN-GP baseline on the same representation and backbone as the diffusion model.

Generator: for the given atom types, draws uniform random fractional coordinates and a per-crystal noise
vector, and maps them in one pass of the periodic backbone to coordinate displacements (wrapped) and the
6 standardised cell parameters. Critic: the same backbone reading (atom types, coordinates, lattice) and
pooling to one score. Gradient penalty (Gulrajani et al. 2017) on points between real and generated
crystals; coordinates are interpolated along the shortest path on the torus so the interpolate stays a
sensible crystal. It is here as the baseline the diffusion model must beat, as in the CrysTens / CDVAE /
DiffCSP comparisons: a one-shot generator has no iterative refinement to place atoms precisely.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from generators.networks import PeriodicBackbone
from generators.representation import CrystalBatch, wrap, wrapped_difference


@dataclass
class WGANConfig:
    hidden: int = 128
    layers: int = 4
    n_freq: int = 8
    noise_dim: int = 32
    critic_steps: int = 5
    gradient_penalty: float = 10.0


class CrystalWGAN(nn.Module):
    kind = "wgan"

    def __init__(self, config: WGANConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.generator = PeriodicBackbone(c.hidden, c.layers, c.n_freq, c.noise_dim, node_out=3, graph_out=6)
        self.critic = PeriodicBackbone(c.hidden, c.layers, c.n_freq, 1, node_out=0, graph_out=1)

    def hyperparameters(self) -> dict:
        return asdict(self.config)

    def make_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.9)),
            "critic": torch.optim.Adam(self.critic.parameters(), lr=lr, betas=(0.5, 0.9)),
        }

    def generate(self, batch: CrystalBatch, generator: torch.Generator | None = None) -> CrystalBatch:
        b = batch.frac.shape[0]
        maskf = batch.mask.float()[..., None]
        start = torch.rand(batch.frac.shape, generator=generator)
        noise = torch.randn(b, self.config.noise_dim, generator=generator)
        displacement, lattice = self.generator(batch.numbers, batch.mask, start, torch.zeros(b, 6), noise)
        frac = wrap(start + displacement) * maskf
        return CrystalBatch(batch.numbers, frac, lattice, batch.mask, batch.n_atoms)

    def score(self, batch: CrystalBatch, frac: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        cond = torch.zeros(frac.shape[0], 1)
        _, out = self.critic(batch.numbers, batch.mask, frac, lattice, cond)
        return out[:, 0]

    def training_step(
        self, batch: CrystalBatch, optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator
    ) -> dict[str, float]:
        c = self.config
        critic_opt, generator_opt = optimizers["critic"], optimizers["generator"]
        b = batch.frac.shape[0]
        maskf = batch.mask.float()[..., None]
        for _ in range(c.critic_steps):
            with torch.no_grad():
                fake = self.generate(batch, generator)
            u = torch.rand(b, 1, 1, generator=generator)
            frac_mix = wrap(batch.frac + u * wrapped_difference(fake.frac, batch.frac)) * maskf
            lattice_mix = batch.lattice + u[:, 0] * (fake.lattice - batch.lattice)
            frac_mix.requires_grad_(True)
            lattice_mix.requires_grad_(True)
            mixed_score = self.score(batch, frac_mix, lattice_mix)
            grad_frac, grad_lattice = torch.autograd.grad(
                mixed_score.sum(), [frac_mix, lattice_mix], create_graph=True
            )
            norm = torch.sqrt((grad_frac**2).sum((1, 2)) + (grad_lattice**2).sum(1) + 1e-12)
            penalty = ((norm - 1) ** 2).mean()
            wasserstein = (
                self.score(batch, fake.frac, fake.lattice).mean()
                - self.score(batch, batch.frac, batch.lattice).mean()
            )
            critic_loss = wasserstein + c.gradient_penalty * penalty
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()
        fake = self.generate(batch, generator)
        generator_loss = -self.score(batch, fake.frac, fake.lattice).mean()
        generator_opt.zero_grad()
        generator_loss.backward()
        generator_opt.step()
        return {"wasserstein": float(-wasserstein.detach()), "penalty": float(penalty.detach())}

    @torch.no_grad()
    def sample(self, batch: CrystalBatch, generator: torch.Generator | None = None) -> CrystalBatch:
        return self.generate(batch, generator)
