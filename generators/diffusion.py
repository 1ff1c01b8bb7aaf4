"""Joint denoising diffusion of lattice and fractional coordinates, conditioned on the atom types
(the DiffCSP recipe, Jiao et al. 2023).

* Lattice: DDPM (cosine schedule) on the 6 standardised cell parameters; the network predicts the noise.
* Fractional coordinates: score matching with wrapped-normal noise, sigma growing geometrically from
  ``sigma_min`` to ``sigma_max``. The score of a wrapped normal is a sum over periodic images; the network
  predicts it divided by its root mean square at that noise level, so every noise level has a unit target.
* Sampling runs the reverse process with a predictor (reverse VE step for the coordinates, DDPM ancestral
  step for the lattice) and a Langevin corrector on the coordinates.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from generators.networks import PeriodicBackbone, sinusoidal_embedding
from generators.representation import CrystalBatch, wrap

IMAGES = torch.arange(-3, 4, dtype=torch.float32)  # periodic images summed in the wrapped-normal score
LATTICE_CLIP = 4.0  # standard deviations: the predicted clean lattice stays within the training range


@dataclass
class DiffusionConfig:
    hidden: int = 128
    layers: int = 4
    n_freq: int = 8
    time_dim: int = 64
    timesteps: int = 1000
    sigma_min: float = 0.005
    sigma_max: float = 0.5
    corrector_step: float = 1e-5  # Langevin step size at sigma_min, scaled by (sigma / sigma_min)^2
    lattice_loss_weight: float = 1.0


def wrapped_normal_score(displacement: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """d/dx log sum_k N(x + k; 0, sigma^2) at x = displacement (element-wise; sigma broadcastable)."""
    images = IMAGES.to(displacement)
    shifted = displacement[..., None] + images  # [..., K]
    sigma = sigma[..., None]
    log_weights = -(shifted**2) / (2 * sigma**2)
    weights = torch.softmax(log_weights, dim=-1)
    return (weights * (-shifted / sigma**2)).sum(-1)


@functools.lru_cache(maxsize=4)
def _score_norms_for(sigma_min: float, sigma_max: float, timesteps: int) -> torch.Tensor:
    """The normalisers of one schedule, computed once per process (a model load should not pay for it)."""
    t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
    return _score_norms(sigma_min * (sigma_max / sigma_min) ** t)


def _score_norms(sigmas: torch.Tensor, grid: int = 2000) -> torch.Tensor:
    """E[score^2] of the wrapped normal at each sigma, by quadrature over one period (deterministic)."""
    x = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid - 0.5
    images = IMAGES.double()
    norms = []
    for chunk in torch.split(sigmas.double(), 50):
        shifted = x[None, :, None] + images  # [1, G, K]
        sigma = chunk[:, None, None]
        log_terms = -(shifted**2) / (2 * sigma**2)
        density = torch.exp(log_terms).sum(-1)  # unnormalised; the normalisation cancels
        score = (torch.softmax(log_terms, dim=-1) * (-shifted / sigma**2)).sum(-1)
        norms.append((density * score**2).sum(1) / density.sum(1))
    return torch.cat(norms).float()


class CrystalDiffusion(nn.Module):
    kind = "diffusion"

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.net = PeriodicBackbone(c.hidden, c.layers, c.n_freq, c.time_dim, node_out=3, graph_out=6)
        t = torch.arange(c.timesteps + 1, dtype=torch.float64) / c.timesteps
        alphas_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        alphas_bar = alphas_bar / alphas_bar[0]
        betas = (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(max=0.999)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_bar", torch.cumprod(1 - betas, 0).float(), persistent=False)
        sigmas = c.sigma_min * (c.sigma_max / c.sigma_min) ** t
        sigmas[0] = 0.0
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        norms = torch.ones_like(sigmas)
        norms[1:] = _score_norms_for(c.sigma_min, c.sigma_max, c.timesteps).double()
        self.register_buffer("score_norms", norms.float(), persistent=False)

    def hyperparameters(self) -> dict:
        return asdict(self.config)

    def make_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {"model": torch.optim.Adam(self.parameters(), lr=lr)}

    def training_step(
        self, batch: CrystalBatch, optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator
    ) -> dict[str, float]:
        optimizer = optimizers["model"]
        optimizer.zero_grad()
        loss = self.loss(batch, generator)
        loss.backward()
        nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        optimizer.step()
        return {"loss": float(loss.detach())}

    def _predict(self, batch: CrystalBatch, frac: torch.Tensor, lattice: torch.Tensor, t: torch.Tensor):
        cond = sinusoidal_embedding(t.float() / self.config.timesteps, self.config.time_dim)
        return self.net(batch.numbers, batch.mask, frac, lattice, cond)

    def loss(self, batch: CrystalBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        b = batch.frac.shape[0]
        t = torch.randint(1, self.config.timesteps + 1, (b,), generator=generator)
        # lattice: DDPM forward process
        noise_l = torch.randn(batch.lattice.shape, generator=generator)
        ab = self.alphas_bar[t][:, None]
        lattice_t = ab.sqrt() * batch.lattice + (1 - ab).sqrt() * noise_l
        # coordinates: wrapped normal
        sigma = self.sigmas[t][:, None, None]
        noise_x = torch.randn(batch.frac.shape, generator=generator)
        frac_t = wrap(batch.frac + sigma * noise_x)
        target_x = wrapped_normal_score(sigma * noise_x, sigma.expand_as(noise_x))
        target_x = target_x / self.score_norms[t][:, None, None].sqrt()
        pred_x, pred_l = self._predict(batch, frac_t, lattice_t, t)
        maskf = batch.mask.float()[..., None]
        loss_x = (((pred_x - target_x) ** 2) * maskf).sum() / (maskf.sum() * 3)
        loss_l = ((pred_l - noise_l) ** 2).mean()
        return loss_x + self.config.lattice_loss_weight * loss_l

    @torch.no_grad()
    def sample(
        self, batch: CrystalBatch, generator: torch.Generator | None = None, steps: int | None = None
    ) -> CrystalBatch:
        """Generate coordinates and lattice for the atom types in ``batch`` (its coordinates are ignored).

        ``steps`` below the training ``timesteps`` walks a strided subset of the noise levels: the
        coordinate predictor is exact for any pair of levels of a variance-exploding process, and the
        lattice uses the DDPM posterior between the two levels (as DDPM with a respaced schedule).
        """
        c = self.config
        steps = c.timesteps if steps is None else max(1, min(int(steps), c.timesteps))
        levels = torch.linspace(c.timesteps, 0, steps + 1).round().long().tolist()
        b = batch.frac.shape[0]
        maskf = batch.mask.float()[..., None]
        frac = torch.rand(batch.frac.shape, generator=generator) * maskf
        lattice = torch.randn(b, 6, generator=generator)
        for step, prev in itertools.pairwise(levels):
            t = torch.full((b,), step, dtype=torch.long)
            sigma, sigma_prev = self.sigmas[step], self.sigmas[prev]
            norm = self.score_norms[step].sqrt()
            # corrector: one Langevin step on the coordinates at this noise level
            if c.corrector_step > 0:
                score, _ = self._predict(batch, frac, lattice, t)
                size = c.corrector_step * (sigma / c.sigma_min) ** 2
                frac = frac + size * score * norm
                frac = frac + (2 * size).sqrt() * torch.randn(frac.shape, generator=generator) * maskf
                frac = wrap(frac) * maskf
            # predictor
            score, eps = self._predict(batch, frac, lattice, t)
            var_step = sigma**2 - sigma_prev**2
            frac = frac + var_step * score * norm
            if prev > 0:
                std = (sigma_prev**2 * var_step / sigma**2).sqrt()
                frac = frac + std * torch.randn(frac.shape, generator=generator) * maskf
            frac = wrap(frac) * maskf
            # lattice: DDPM posterior q(x_prev | x_t, x0) with the predicted x0 clipped to the range the
            # standardised training lattices occupy (the noise-to-x0 division is unstable near t = T)
            ab, ab_prev = self.alphas_bar[step], self.alphas_bar[prev]
            alpha = ab / ab_prev  # of the (possibly strided) step
            beta = 1 - alpha
            x0 = ((lattice - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-LATTICE_CLIP, LATTICE_CLIP)
            lattice = (ab_prev.sqrt() * beta * x0 + alpha.sqrt() * (1 - ab_prev) * lattice) / (1 - ab)
            if prev > 0:
                std = (beta * (1 - ab_prev) / (1 - ab)).sqrt()
                lattice = lattice + std * torch.randn(lattice.shape, generator=generator)
        return CrystalBatch(batch.numbers, frac, lattice, batch.mask, batch.n_atoms)
