"""The screen as one deterministic stream of structures, addressable by a small cursor.

The stream is a list of blocks: elemental references first (the hull needs them whatever else finishes),
then competing phases, then one block per template (and per partial-substitution ordering of it), each
block a sequence of substitutions. A cursor ``(block, index)`` says where the stream stands; the search
stores it with the archive, so a resumed screen continues exactly after the last stored proposal without
re-generating what came before, and without ever holding the whole enumeration in memory.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pymatgen.core import Composition, Structure

from globopt.htvs.partial import partial_orderings
from globopt.htvs.references import elemental_reference
from globopt.htvs.settings import HtvsConfig
from globopt.htvs.substitutions import (
    ExplicitSubstitutions,
    Mapping,
    alloy_decorations,
    can_be_charge_neutral,
    describe,
    is_injective,
    probable_substitutions,
    substitute,
)
from globopt.htvs.templates import STRUCTURE_SUFFIXES, Template, TemplateError, load_templates, read_structure


class EnumerationError(ValueError):
    """The screen cannot be enumerated as configured (unknown element, no reference structure, ...)."""


@dataclass
class Item:
    """One structure of the stream, or the reason it is skipped (``structure`` None)."""

    origin: str
    structure: Structure | None
    skipped: str = ""


class FixedBlock:
    """A short list of ready structures (elemental references, competing phases)."""

    def __init__(self, prefix: str, entries: list[tuple[str, Structure]]) -> None:
        self.prefix = prefix
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def item(self, index: int) -> Item:
        name, structure = self.entries[index]
        return Item(f"{self.prefix}:{name}", structure)

    def fingerprint(self) -> str:
        return f"{self.prefix}:{','.join(name for name, _ in self.entries)}"


class TemplateBlock:
    """Every substitution of one template: the explicit combinations, then data-mined and alloy extras."""

    def __init__(
        self,
        template: Template,
        explicit: ExplicitSubstitutions,
        probable: list[tuple[Mapping, float]],
        config: HtvsConfig,
        alloys: Sequence[Mapping] = (),
    ) -> None:
        self.template = template
        self.explicit = explicit
        # listed extras, each with the note its origin carries; a mapping already enumerated is not repeated
        self.extras: list[tuple[Mapping, str]] = []
        seen: set[tuple[tuple[str, str], ...]] = set()
        listed = [(m, f" p={p:.3g}") for m, p in probable] + [(m, " alloy") for m in alloys]
        for mapping, note in listed:
            key = tuple(sorted(mapping.items()))
            if mapping not in explicit and key not in seen:
                seen.add(key)
                self.extras.append((mapping, note))
        self.config = config

    def __len__(self) -> int:
        return len(self.explicit) + len(self.extras)

    def mapping(self, index: int) -> tuple[Mapping, str]:
        if index < len(self.explicit):
            return self.explicit[index], ""
        return self.extras[index - len(self.explicit)]

    def item(self, index: int) -> Item:
        mapping, note = self.mapping(index)
        origin = f"htvs:{self.template.name}:{describe(mapping)}"
        if not is_injective(mapping):
            return Item(origin, None, "two site-sets would get the same element")
        # decided on the composition alone, before building the structure; an all-metal composition is an
        # intermetallic, with no oxidation states to balance
        if self.config.charge_neutral:
            amounts = self.template.structure.composition.get_el_amt_dict()
            composition = Composition({mapping.get(el, el): n for el, n in amounts.items()})
            metallic = all(el.is_metal for el in composition.elements)
            if not metallic and not can_be_charge_neutral(composition.reduced_formula):
                return Item(origin, None, "no charge-neutral oxidation states")
        structure = substitute(self.template.structure, mapping, self.config.scale_volume)
        return Item(origin + note if note else origin, structure)

    def elements(self) -> set[str]:
        return self.explicit.elements() | {el for m, _ in self.extras for el in m.values()}

    def fingerprint(self) -> str:
        return f"{self.template.name}:{self.template.structure.composition.formula}:{len(self)}"


class Enumeration:
    """Blocks of the screen, built once from the config (templates read, rules expanded per template)."""

    def __init__(self, config: HtvsConfig, covered: frozenset[str] | None = None) -> None:
        self.config = config
        templates = load_templates(config.templates, config.max_atoms)
        templates = templates + self._partial_templates(templates)
        self.template_blocks = [self._template_block(t) for t in templates]
        self._check_rules_name_template_species(templates)
        competing, self.competing_entries_files = _competing_structures(config.competing_phases)
        self.competing_block = FixedBlock("competing", competing)
        elements = set().union(*(b.elements() for b in self.template_blocks))
        elements |= {el.symbol for _, s in competing for el in s.composition.elements}
        unknown = sorted(el for el in elements if covered is not None and el not in covered)
        if unknown:
            raise EnumerationError(
                f"element(s) {', '.join(unknown)} in templates/substitutions are not covered by the potential"
            )
        self.elements = sorted(elements)
        references = []
        if config.elemental_references:
            missing = []
            for symbol in self.elements:
                structure = elemental_reference(symbol)
                if structure is None:
                    missing.append(symbol)
                else:
                    references.append((symbol, structure))
            if missing:
                raise EnumerationError(
                    f"no bundled elemental reference structure for {', '.join(missing)}; give one as a CIF "
                    f"in htvs.competing_phases and set htvs.elemental_references: false"
                )
        self.reference_block = FixedBlock("reference", references)
        self.blocks: list[FixedBlock | TemplateBlock] = [
            self.reference_block,
            self.competing_block,
            *self.template_blocks,
        ]

    def _check_rules_name_template_species(self, templates: list[Template]) -> None:
        """A substitution rule for a species no template has would be ignored without a word: refuse it."""
        species = {sp for t in templates for sp in t.species}
        unused = sorted(set(self.config.substitutions) - species)
        if unused and templates:
            raise EnumerationError(
                f"htvs.substitutions: no template has {', '.join(unused)} (the templates hold "
                f"{', '.join(sorted(species))}); rules apply to a template's species, so remove those rules "
                f"or fix the element"
            )
        for template in templates:
            own = sorted(set(template.substitutions or {}) - set(template.species))
            if own:
                raise EnumerationError(
                    f"template {template.name}: its substitutions name {', '.join(own)}, which it does not "
                    f"hold (it holds {', '.join(template.species)}); remove those rules or fix the element"
                )

    def check_yields_candidates(self, stop_after: int | None = None) -> None:
        """Raise EnumerationError when the screen would propose no substituted structure at all.

        Such a screen relaxes its references and ends with an empty ranked.csv, which reads as "nothing
        is stable" rather than "nothing was screened". The structures are scanned up to the first one
        that passes the filters (usually the first).
        """
        fixed = len(self.reference_block) + len(self.competing_block)
        if not self.template_blocks:
            raise EnumerationError(
                "no template structure was loaded (check htvs.templates and htvs.max_atoms)"
            )
        if self.n_substitutions() == 0:
            raise EnumerationError(
                "the substitution rules give no structure: with keep_original: false every template species "
                "needs a rule in htvs.substitutions (or the template's own substitutions)"
            )
        if stop_after is not None and stop_after <= fixed:
            raise EnumerationError(
                f"htvs.stop_after: {stop_after} ends the screen before its first substituted structure "
                f"({len(self.reference_block)} elemental references and {len(self.competing_block)} "
                f"competing phases come first); raise it above {fixed}"
            )
        reasons: dict[str, int] = {}
        for block_index, block in enumerate(self.blocks):
            if not isinstance(block, TemplateBlock):
                continue
            for index in range(len(block)):
                item = self.item(block_index, index)
                if item.structure is not None:
                    return
                reasons[item.skipped] = reasons.get(item.skipped, 0) + 1
        summary = ", ".join(f"{n} with {reason}" for reason, n in sorted(reasons.items()))
        raise EnumerationError(
            f"every one of the {self.n_substitutions()} substitutions is skipped by the filters ({summary}); "
            f"loosen them (e.g. htvs.charge_neutral: false) or change the rules"
        )

    def _partial_templates(self, templates: list[Template]) -> list[Template]:
        extra = []
        for spec in self.config.partial:
            for template in templates:
                for label, structure in partial_orderings(template.structure, spec, self.config.max_atoms):
                    extra.append(Template(f"{template.name}+{label}", structure, template.substitutions))
        return extra

    def _template_block(self, template: Template) -> TemplateBlock:
        rules = template.substitutions if template.substitutions is not None else self.config.substitutions
        allowed = self.config.elements
        explicit = ExplicitSubstitutions(template.species, rules, self.config.keep_original, allowed)
        probable: list[tuple[Mapping, float]] = []
        if self.config.probability is not None:
            p = self.config.probability
            probable = probable_substitutions(template.structure, p.threshold, p.max_per_template, allowed)
        alloys: list[Mapping] = []
        if self.config.alloys is not None:
            a = self.config.alloys
            pool = [el for el in a.elements if allowed is None or el in allowed]
            alloys = alloy_decorations(template, pool, a.max_per_template, a.seed)
        return TemplateBlock(template, explicit, probable, self.config, alloys)

    def __len__(self) -> int:
        return sum(len(b) for b in self.blocks)

    def n_substitutions(self) -> int:
        return sum(len(b) for b in self.template_blocks)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Changes when templates or rules change, so a resume cannot continue a different enumeration."""
        text = "|".join(b.fingerprint() for b in self.blocks)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def item(self, block: int, index: int) -> Item:
        return self.blocks[block].item(index)


def _competing_structures(paths: Sequence[str]) -> tuple[list[tuple[str, Structure]], list[Path]]:
    """Structures to relax from CIF/POSCAR files and folders; JSON files are entry lists used as given."""
    structures: list[tuple[str, Structure]] = []
    entry_files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.suffix.lower() == ".json":
            if not path.is_file():
                raise TemplateError(f"competing-phase entries file {path} does not exist")
            from globopt.htvs.hull import load_entries

            try:
                load_entries(path)
            except ValueError as exc:
                raise TemplateError(str(exc)) from None
            entry_files.append(path)
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in STRUCTURE_SUFFIXES)
            structures += [(p.stem, read_structure(p)) for p in files]
        elif path.is_file():
            structures.append((path.stem, read_structure(path)))
        else:
            raise TemplateError(f"competing phase {path} does not exist")
    for name, structure in structures:
        if not structure.is_ordered:
            raise TemplateError(f"competing phase {name} has partial occupancies; give an ordered structure")
    return structures, entry_files
