"""Crystal-structure-prediction metrics in the CDVAE / DiffCSP protocol.

For every test structure the generator gets its atom types and produces ``samples`` structures; a test
structure is matched if any valid sample matches it under ``StructureMatcher(stol=0.5, angle_tol=10,
ltol=0.3)``, and its RMSE is the smallest normalised RMS displacement among the matching samples (pymatgen
``get_rms_dist``, normalised by (V/N)^(1/3)). A sample is structurally valid when every interatomic
distance is above 0.5 Å and the volume above 0.1 Å^3 (CDVAE's definition); invalid samples never match.
(CDVAE and DiffCSP additionally require SMACT charge-neutrality of the composition, which is the given
test composition here and not something the generator controls.)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

MIN_DISTANCE = 0.5  # Å
MIN_VOLUME = 0.1  # Å^3


def structurally_valid(structure: Structure) -> bool:
    if not np.isfinite(structure.lattice.matrix).all() or structure.volume < MIN_VOLUME:
        return False
    if len(structure) == 1:
        return min(structure.lattice.abc) > MIN_DISTANCE
    distances = structure.distance_matrix + np.eye(len(structure)) * 1e3
    return bool(distances.min() > MIN_DISTANCE)


def same_composition(generated: Structure, reference: Structure) -> bool:
    return generated.composition == reference.composition


def csp_metrics(generated: Sequence[Sequence[Structure]], references: Sequence[Structure]) -> dict[str, Any]:
    """Match rate, RMSE, validity and composition kept of ``generated[i]`` (samples) vs ``references[i]``."""
    matcher = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
    matched, rmses, valid, composition_kept, total = 0, [], 0, 0, 0
    for samples, reference in zip(generated, references, strict=True):
        best = None
        for sample in samples:
            total += 1
            ok = structurally_valid(sample)
            valid += ok
            composition_kept += same_composition(sample, reference)
            if not ok:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    rms = matcher.get_rms_dist(sample, reference)
                except Exception:  # a degenerate lattice can make the matcher fail; that is no match
                    rms = None
            if rms is not None and (best is None or rms[0] < best):
                best = rms[0]
        if best is not None:
            matched += 1
            rmses.append(best)
    n = len(references)
    return {
        "structures": n,
        "samples_per_structure": total // max(n, 1),
        "match_rate": matched / n if n else 0.0,
        "rmse": float(np.mean(rmses)) if rmses else None,
        "structural_validity": valid / total if total else 0.0,
        "composition_kept": composition_kept / total if total else 0.0,
    }


def evaluate_generator(
    generator,
    references: Sequence[Structure],
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    steps: int | None = None,
) -> dict[str, Any]:
    """Sample ``samples`` structures for each reference composition and score them (plus sampling speed)."""
    species = [[site.specie.symbol for site in s] for s in references]
    started = time.perf_counter()
    per_round = [
        generator.generate(species, seed=seed + r, batch_size=batch_size, steps=steps) for r in range(samples)
    ]
    seconds = time.perf_counter() - started
    generated = [[per_round[r][i] for r in range(samples)] for i in range(len(references))]
    result = csp_metrics(generated, references)
    result["sampling_seconds"] = seconds
    result["structures_per_second"] = len(references) * samples / seconds if seconds > 0 else None
    return result
