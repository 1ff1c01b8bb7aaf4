"""Training loop for both generator kinds, with time limit, periodic checkpoints and ``--resume``.

The loop is model-agnostic: a model provides ``make_optimizers(lr)`` and ``training_step(batch,
optimizers, generator)``. Batches are shuffled with a generator seeded from (seed, epoch), so a resumed
run draws the same batches it would have drawn without the interruption.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generators.checkpoint import GeneratorCheckpoint, build_model, load_checkpoint
from generators.data import load_structures
from generators.representation import Crystal, CrystalBatch, LatticeScaler

log = logging.getLogger("globopt.generators")
CHECKPOINT_EVERY_SECONDS = 60.0


@dataclass
class TrainSettings:
    kind: str = "diffusion"
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    max_minutes: float | None = None
    seed: int = 0
    limit: int | None = None  # first rows of the data only
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    # Also train on supercells of every structure, m cells along one lattice axis for each m listed: a data
    # set of 5-atom cells otherwise teaches nothing about 10-atom cells of the same compounds, which is what
    # a search over formula units asks the model for.
    supercells: tuple[int, ...] = ()
    init: str | None = None  # start from this checkpoint's weights and lattice standardisation (fine-tuning)


def crystals_from(
    data: str | Path, limit: int | None = None, supercells: tuple[int, ...] = (), seed: int = 0
) -> list[Crystal]:
    structures, _ = load_structures(data, limit)
    rng = np.random.default_rng([seed, 7])
    extra = []
    for multiple in supercells:
        for structure in structures:
            scaling = [1, 1, 1]
            scaling[int(rng.integers(3))] = multiple
            extra.append(structure.make_supercell(scaling, in_place=False))
    return [Crystal.from_structure(s) for s in [*structures, *extra]]


def train(
    data: str | Path, out: str | Path, settings: TrainSettings, resume: bool = False
) -> GeneratorCheckpoint:
    """Train (or continue training) a generator on ``data`` and write the checkpoint to ``out``."""
    out = Path(out)
    crystals = crystals_from(data, settings.limit, settings.supercells, settings.seed)
    vocabulary = sorted({str(z) for c in crystals for z in c.numbers}, key=int)
    from pymatgen.core import Element

    symbols = [Element.from_Z(int(z)).symbol for z in vocabulary]
    if resume:
        previous = load_checkpoint(out)
        model = previous.build_model()
        scaler = previous.scaler
        progress = previous.training
        optimizers = model.make_optimizers(settings.lr)
        for name, state in previous.optimizer_states.items():
            optimizers[name].load_state_dict(state)
        log.info("resuming %s training at epoch %d", previous.kind, progress.get("epochs", 0))
        kind, hyper = previous.kind, previous.hyperparameters
    elif settings.init is not None:
        start = load_checkpoint(settings.init)
        model = start.build_model()  # its lattice outputs are in its own standardisation: keep it
        scaler = start.scaler
        progress = {"epochs": 0, "steps": 0, "seconds": 0.0, "history": [], "init": str(settings.init)}
        optimizers = model.make_optimizers(settings.lr)
        kind, hyper = start.kind, start.hyperparameters
        log.info("fine-tuning %s from %s (%d epochs there)", kind, settings.init, start.training["epochs"])
    else:
        model = build_model(settings.kind, settings.hyperparameters)
        scaler = LatticeScaler.fit(
            np.stack([c.params for c in crystals]), np.array([len(c.numbers) for c in crystals])
        )
        progress = {"epochs": 0, "steps": 0, "seconds": 0.0, "history": []}
        optimizers = model.make_optimizers(settings.lr)
        kind, hyper = settings.kind, model.hyperparameters()
    model.train()
    dataset = {
        "path": str(data),
        "structures": len(crystals),
        "max_atoms": int(max(len(c.numbers) for c in crystals)),
        "supercells": list(settings.supercells),
    }

    def snapshot() -> GeneratorCheckpoint:
        return GeneratorCheckpoint(
            kind=kind, hyperparameters=hyper, scaler=scaler, vocabulary=symbols, dataset=dataset,
            model_state=model.state_dict(), training=progress,
            optimizer_states={name: opt.state_dict() for name, opt in optimizers.items()},
        )  # fmt: skip

    started = time.monotonic()
    seconds_before = progress["seconds"]
    last_save = started
    deadline = None if settings.max_minutes is None else started + 60 * settings.max_minutes
    while progress["epochs"] < settings.epochs:
        epoch = progress["epochs"]
        order = np.random.default_rng([settings.seed, epoch]).permutation(len(crystals))
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
        sums: dict[str, float] = {}
        batches = 0
        for start in range(0, len(order), settings.batch_size):
            batch = CrystalBatch.collate(
                [crystals[i] for i in order[start : start + settings.batch_size]], scaler
            )
            for name, value in model.training_step(batch, optimizers, generator).items():
                sums[name] = sums.get(name, 0.0) + value
            batches += 1
            progress["steps"] += 1
        progress["epochs"] += 1
        progress["seconds"] = seconds_before + time.monotonic() - started
        means = {name: value / batches for name, value in sums.items()}
        progress["history"].append({"epoch": progress["epochs"], **means})
        log.info(
            "epoch %d/%d %s (%.0f s)", progress["epochs"], settings.epochs,
            " ".join(f"{k}={v:.4f}" for k, v in means.items()), progress["seconds"],
        )  # fmt: skip
        now = time.monotonic()
        if now - last_save > CHECKPOINT_EVERY_SECONDS:
            snapshot().save(out)
            last_save = now
        if deadline is not None and now > deadline:
            log.info(
                "time limit of %.1f minutes reached after %d epochs", settings.max_minutes, progress["epochs"]
            )
            break
    final = snapshot()
    final.save(out)
    model.eval()
    return final
