"""Substitution rules: which element goes on each template species' sites.

Three sources, combined per template:

* explicit mappings (``{Na: [Li, K], Cl: [Br, I]}``): every combination of the allowed elements per
  site-set. The combinations form a mixed-radix sequence, so item ``i`` is computed from ``i`` alone and a
  screen of millions of combinations never holds them in memory (resume jumps straight to its cursor).
* data-mined ionic substitutions (Hautier et al., Inorg. Chem. 50, 656 (2011); pymatgen's
  ``SubstitutionPredictor`` over ``lambda.json``): substitutions of the whole oxidation-state-decorated
  template more probable than a threshold. These are few per template and are listed once.
* alloy decorations of all-metal templates with metals from a pool (the data-mined model is over ions
  and says nothing about intermetallics), a fixed pseudo-random selection per template.

Optional filters: charge neutrality (pymatgen's oxidation-state guesser finds at least one neutral
assignment) and the cell size limit.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pymatgen.core import Composition, Structure

if TYPE_CHECKING:
    from globopt.htvs.templates import Template

Mapping = dict[str, str]  # template species -> element put on its sites


def describe(mapping: Mapping) -> str:
    """'Na>K,Cl>Br' for the changed sites, 'original' when nothing changes."""
    changed = [f"{old}>{new}" for old, new in mapping.items() if old != new]
    return ",".join(changed) or "original"


class ExplicitSubstitutions:
    """All combinations of allowed elements per template species, addressable by index."""

    def __init__(
        self,
        species: Sequence[str],
        rules: dict[str, list[str]],
        keep_original: bool,
        elements: Sequence[str] | None = None,
    ) -> None:
        """``elements``: when given, no site gets an element outside it (its template species included)."""
        self.species = list(species)
        self.choices: list[list[str]] = []
        for site in self.species:
            allowed = ([site] if keep_original or site not in rules else []) + rules.get(site, [])
            if elements is not None:
                allowed = [el for el in allowed if el in elements]
            self.choices.append(list(dict.fromkeys(allowed)))
        self.size = math.prod(len(c) for c in self.choices)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Mapping:
        if not 0 <= index < self.size:
            raise IndexError(index)
        mapping = {}
        for site, allowed in zip(reversed(self.species), reversed(self.choices), strict=True):
            index, digit = divmod(index, len(allowed))
            mapping[site] = allowed[digit]
        return {site: mapping[site] for site in self.species}

    def __contains__(self, mapping: Mapping) -> bool:
        return all(
            mapping.get(site) in allowed for site, allowed in zip(self.species, self.choices, strict=True)
        )

    def elements(self) -> set[str]:
        return {el for allowed in self.choices for el in allowed}


@functools.lru_cache(maxsize=1)
def _predictor(threshold: float):
    from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionPredictor

    return SubstitutionPredictor(threshold=threshold)


@functools.lru_cache(maxsize=1)
def _known_ions(threshold: float) -> frozenset[str]:
    return frozenset(str(species) for species in _predictor(threshold).p.species)


@functools.cache
def _predictions(ions: tuple[str, ...], threshold: float) -> list[dict]:
    """pymatgen's predictions for a set of ions, kept for the process: a library of templates repeats ion
    sets, and a run checks its config before building its search, which enumerates the same templates
    (the predictor walks every substitution tree: up to seconds per ternary template)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _predictor(threshold).list_prediction(list(ions))


def probable_substitutions(
    structure: Structure, threshold: float, limit: int, elements: Sequence[str] | None = None
) -> list[tuple[Mapping, float]]:
    """Element mappings of the template more probable than ``threshold``, most probable first.

    The template's oxidation states are guessed first (the model is over ions); a template without a
    charge-balanced guess (an intermetallic, say), or whose ions the model does not know (As3-, a neutral
    metal), has no data-mined substitutions and gets none. ``elements`` keeps only mappings onto those.
    """
    from pymatgen.core.periodic_table import Species

    known = _known_ions(threshold)
    for oxidation in structure.composition.oxi_state_guesses(max_sites=-1):
        ions = {str(Species(element, round(state))): element for element, state in oxidation.items()}
        if known.issuperset(ions):
            break
    else:
        return []
    predictions = _predictions(tuple(ions), threshold)
    allowed = None if elements is None else set(elements)
    best: dict[tuple[tuple[str, str], ...], float] = {}
    for prediction in predictions:
        mapping = {ions[str(old)]: new.symbol for new, old in prediction["substitutions"].items()}
        if allowed is not None and not set(mapping.values()) <= allowed:
            continue
        key = tuple(sorted(mapping.items()))
        best[key] = max(best.get(key, 0.0), float(prediction["probability"]))
    ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return [(dict(key), probability) for key, probability in ranked]


def alloy_decorations(template: Template, pool: Sequence[str], limit: int, seed: int) -> list[Mapping]:
    """Up to ``limit`` assignments of distinct pool metals to an all-metal template's species.

    An empty list for a template with a non-metal species. The choice is fixed by the template's
    name and ``seed``, so the same config always screens the same decorations (resume relies on it).
    """
    from pymatgen.core.periodic_table import Element

    species = template.species
    if not all(Element(el).is_metal for el in species):
        return []
    metals = list(dict.fromkeys(pool))
    if len(metals) < len(species):
        return []
    digest = hashlib.sha256(f"{template.name}|{seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    total = math.perm(len(metals), len(species))
    if total <= 4 * limit:  # few enough to list: an exact shuffle
        every = list(itertools.permutations(metals, len(species)))
        chosen = [every[i] for i in rng.permutation(len(every))[:limit]]
    else:  # draw distinct tuples (a handful of repeats to skip at most)
        seen: set[tuple[str, ...]] = set()
        chosen = []
        while len(chosen) < limit:
            pick = tuple(metals[i] for i in rng.choice(len(metals), size=len(species), replace=False))
            if pick not in seen:
                seen.add(pick)
                chosen.append(pick)
    return [dict(zip(species, pick, strict=True)) for pick in chosen]


def is_injective(mapping: Mapping) -> bool:
    """Two site-sets mapped onto one element would merge sites: that is another template, not this one."""
    return len(set(mapping.values())) == len(mapping)


@functools.lru_cache(maxsize=4096)
def can_be_charge_neutral(formula: str) -> bool:
    return bool(Composition(formula).oxi_state_guesses(max_sites=-1))


def substitute(template: Structure, mapping: Mapping, scale_volume: bool) -> Structure:
    """The template with its species replaced, its volume rescaled for the new atoms' sizes.

    Volume from pymatgen's RLSVolumePredictor (ratio of ionic radii where oxidation states are known,
    atomic radii otherwise) so M3GNet starts near the minimum instead of spending steps on the cell.
    """
    structure = template.copy()
    structure.replace_species({old: new for old, new in mapping.items() if old != new})
    if scale_volume and any(old != new for old, new in mapping.items()):
        volume = _predicted_volume(structure, template)
        if volume is not None:
            structure.scale_lattice(volume)
    return structure


def _predicted_volume(structure: Structure, template: Structure) -> float | None:
    from pymatgen.analysis.structure_prediction.volume_predictor import RLSVolumePredictor

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = float(RLSVolumePredictor(check_isostructural=False).predict(structure, template))
    except Exception:  # no radius known for some element: keep the template's cell
        return None
    ratio = volume / template.volume
    # radii ratios outside this range mean the predictor extrapolated wildly; the relaxation does better
    return volume if math.isfinite(volume) and 0.2 < ratio < 5.0 else None
