"""Substitution rules: which element goes on each template species' sites.

Two sources, combined per template:

* explicit mappings (``{Na: [Li, K], Cl: [Br, I]}``): every combination of the allowed elements per
  site-set. The combinations form a mixed-radix sequence, so item ``i`` is computed from ``i`` alone and a
  screen of millions of combinations never holds them in memory (resume jumps straight to its cursor).
* data-mined ionic substitutions (Hautier et al., Inorg. Chem. 50, 656 (2011); pymatgen's
  ``SubstitutionPredictor`` over ``lambda.json``): substitutions of the whole oxidation-state-decorated
  template more probable than a threshold. These are few per template and are listed once.

Optional filters: charge neutrality (pymatgen's oxidation-state guesser finds at least one neutral
assignment) and the cell size limit.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

from pymatgen.core import Composition, Structure

Mapping = dict[str, str]  # template species -> element put on its sites


def describe(mapping: Mapping) -> str:
    """'Na>K,Cl>Br' for the changed sites, 'original' when nothing changes."""
    changed = [f"{old}>{new}" for old, new in mapping.items() if old != new]
    return ",".join(changed) or "original"


class ExplicitSubstitutions:
    """All combinations of allowed elements per template species, addressable by index."""

    def __init__(self, species: Sequence[str], rules: dict[str, list[str]], keep_original: bool) -> None:
        self.species = list(species)
        self.choices: list[list[str]] = []
        for site in self.species:
            allowed = ([site] if keep_original or site not in rules else []) + rules.get(site, [])
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


def probable_substitutions(structure: Structure, threshold: float, limit: int) -> list[tuple[Mapping, float]]:
    """Element mappings of the template more probable than ``threshold``, most probable first.

    The template's oxidation states are guessed first (the model is over ions); a template without a
    charge-balanced guess (an intermetallic, say) has no data-mined substitutions and gets none.
    """
    guesses = structure.composition.oxi_state_guesses(max_sites=-1)
    if not guesses:
        return []
    oxidation = guesses[0]
    ions = {}
    for element, state in oxidation.items():
        from pymatgen.core.periodic_table import Species

        ions[str(Species(element, round(state)))] = element
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictions = _predictor(threshold).list_prediction(list(ions))
    best: dict[tuple[tuple[str, str], ...], float] = {}
    for prediction in predictions:
        mapping = {ions[str(old)]: new.symbol for new, old in prediction["substitutions"].items()}
        key = tuple(sorted(mapping.items()))
        best[key] = max(best.get(key, 0.0), float(prediction["probability"]))
    ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return [(dict(key), probability) for key, probability in ranked]


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
