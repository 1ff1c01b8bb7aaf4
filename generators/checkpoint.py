"""Generator checkpoints: one torch file holding everything needed to sample or continue training.

Contents (plain types and tensors only, so ``torch.load(weights_only=True)`` reads it and a checkpoint
can never execute code): format name and version, model kind and hyperparameters, the element vocabulary
and lattice standardisation of the training set, where the training data came from, the weights, the
training progress (epochs, steps, loss history) and, unless stripped for shipping, the optimiser states
that ``--resume`` continues from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from generators.representation import LatticeScaler

FORMAT = "globopt-generator"
FORMAT_VERSION = 1
KINDS = ("diffusion", "wgan")
DEFAULT_CHECKPOINT = "diffusion_perov5_sc2.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what was expected."""


@dataclass
class GeneratorCheckpoint:
    kind: str
    hyperparameters: dict[str, Any]
    scaler: LatticeScaler
    vocabulary: list[str]
    dataset: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    training: dict[str, Any] = field(default_factory=dict)
    optimizer_states: dict[str, Any] = field(default_factory=dict)
    _model: nn.Module | None = field(default=None, repr=False, compare=False)

    def build_model(self) -> nn.Module:
        """The model with the checkpoint's weights, in eval mode (built once; later calls reuse it)."""
        if self._model is not None:
            return self._model
        model = build_model(self.kind, self.hyperparameters)
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint weights do not fit a {self.kind} model with {self.hyperparameters}: {exc}"
            ) from None
        model.eval()
        self._model = model
        return model

    def save(self, path: str | Path, with_optimizer: bool = True) -> None:
        """Atomic write (temporary file + rename): a crash never leaves half a checkpoint."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "hyperparameters": self.hyperparameters,
            "lattice_scaler": {"mean": list(self.scaler.mean), "std": list(self.scaler.std)},
            "vocabulary": list(self.vocabulary),
            "dataset": self.dataset,
            "model_state": {k: v.detach().clone() for k, v in self.model_state.items()},
            "training": self.training,
            "optimizer_states": self.optimizer_states if with_optimizer else {},
        }
        temporary = path.with_name(path.name + ".tmp")
        torch.save(payload, temporary)
        os.replace(temporary, path)


def build_model(kind: str, hyperparameters: dict[str, Any]) -> nn.Module:
    if kind == "diffusion":
        from generators.diffusion import CrystalDiffusion, DiffusionConfig

        return CrystalDiffusion(DiffusionConfig(**hyperparameters))
    if kind == "wgan":
        from generators.wgan import CrystalWGAN, WGANConfig

        return CrystalWGAN(WGANConfig(**hyperparameters))
    raise CheckpointError(f"unknown generator kind {kind!r}; expected one of {', '.join(KINDS)}")


def shipped_checkpoint(name: str = DEFAULT_CHECKPOINT) -> Path:
    """Path of a checkpoint shipped inside the package (generators/checkpoints/)."""
    return Path(str(resources.files("generators") / "checkpoints" / name))


def resolve_checkpoint(spec: str | Path) -> Path:
    """'default', a shipped checkpoint's file name, or a path -> an existing file (CheckpointError if not)."""
    text = str(spec)
    if text == "default":
        path = shipped_checkpoint()
    elif (shipped := shipped_checkpoint(text)).is_file() and not Path(text).exists():
        path = shipped
    else:
        path = Path(text).expanduser()
    if not path.is_file():
        available = sorted(p.name for p in shipped_checkpoint().parent.glob("*.pt"))
        raise CheckpointError(
            f"generator checkpoint {text!r} not found; expected 'default', a path to a .pt file from "
            f"`globopt generator train`, or one of the shipped checkpoints: {', '.join(available) or 'none'}"
        )
    return path


def load_checkpoint(path: str | Path) -> GeneratorCheckpoint:
    path = resolve_checkpoint(path)
    expected = (
        f"expected a {FORMAT} checkpoint (format version {FORMAT_VERSION}) from `globopt generator train`"
    )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc}); {expected}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a generator checkpoint; {expected}")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}; this globopt reads version {FORMAT_VERSION}"
        )
    missing = [
        key
        for key in ("kind", "hyperparameters", "lattice_scaler", "vocabulary", "model_state")
        if key not in payload
    ]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}; {expected}")
    if payload["kind"] not in KINDS:
        raise CheckpointError(
            f"{path}: unknown model kind {payload['kind']!r}; expected one of {', '.join(KINDS)}"
        )
    scaler = payload["lattice_scaler"]
    checkpoint = GeneratorCheckpoint(
        kind=payload["kind"],
        hyperparameters=dict(payload["hyperparameters"]),
        scaler=LatticeScaler(tuple(scaler["mean"]), tuple(scaler["std"])),
        vocabulary=list(payload["vocabulary"]),
        dataset=dict(payload.get("dataset", {})),
        model_state=payload["model_state"],
        training=dict(payload.get("training", {})),
        optimizer_states=dict(payload.get("optimizer_states", {})),
    )
    try:
        checkpoint.build_model()
    except (TypeError, CheckpointError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return checkpoint
