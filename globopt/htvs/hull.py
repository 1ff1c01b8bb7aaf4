"""Stability of screened structures: formation energy and energy above the convex hull.

Every energy on a hull comes from the same potential: elemental references and competing phases are
relaxed in the same run as the candidates (origins ``reference:*``, ``competing:*``); a user-supplied
entries JSON is taken as given and must hold energies from the same potential. Each candidate is placed on
the hull of its own chemical system (all relaxed entries whose elements are a subset of its elements),
which keeps every pymatgen ``PhaseDiagram`` low-dimensional however many elements the screen spans.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition

from globopt.archive import Archive
from globopt.candidate import FINISHED_WITH_ENERGY, Status


@dataclass
class ScreenedCandidate:
    """One enumerated structure of the screen, as ranked.csv reports it."""

    id: int
    template: str
    substitution: str
    formula: str
    status: str
    energy_per_atom: float | None = None
    formation_energy_per_atom: float | None = None
    e_above_hull: float | None = None
    spacegroup: str | None = None
    duplicate_of: int | None = None
    note: str = ""

    @property
    def chemsys(self) -> str:
        return "-".join(sorted(el.symbol for el in Composition(self.formula).elements))


def parse_origin(origin: str) -> tuple[str, str, str]:
    """('htvs'|'reference'|'competing', template or name, substitution) from an archive origin."""
    kind, _, rest = origin.partition(":")
    if kind != "htvs":
        return kind, rest, ""
    template, _, substitution = rest.rpartition(":")
    return kind, template, substitution


class StabilityAnalysis:
    """Hulls of every chemical system the screen touched, built from the archive on demand."""

    def __init__(self, archive: Archive, entries_files: Iterable[Path] = ()) -> None:
        self.entries: list[PDEntry] = []
        self.candidates: list[ScreenedCandidate] = []
        self.kinds: dict[int, str] = {}
        by_id: dict[int, ScreenedCandidate] = {}
        for row in archive.finished():
            kind, template, substitution = parse_origin(row.origin)
            self.kinds[row.id] = kind
            # An unconverged relaxation still gives an upper bound on the energy: it may stand on a hull
            # (its status says so in ranked.csv) rather than leave a chemical system without a reference.
            relaxed = row.status in FINISHED_WITH_ENERGY and row.enthalpy_per_atom is not None
            if relaxed:
                energy = row.enthalpy_per_atom * row.n_atoms  # the energy at the run's pressure
                formula = Composition(row.formula).reduced_formula
                label = template if kind != "htvs" else f"{formula} ({template})"
                self.entries.append(PDEntry(Composition(row.formula), energy, name=label, attribute=row.id))
            if kind != "htvs":
                continue
            candidate = ScreenedCandidate(
                id=row.id,
                template=template,
                substitution=substitution.split(" ")[0],
                formula=Composition(row.formula).reduced_formula,
                status=row.status,
                energy_per_atom=row.enthalpy_per_atom if relaxed else None,
                spacegroup=row.spacegroup,
                duplicate_of=row.duplicate_of,
                note=row.reason or "",
            )
            self.candidates.append(candidate)
            by_id[candidate.id] = candidate
        for path in entries_files:
            self.entries.extend(load_entries(path))
        self._hulls = SubsystemHulls(self.entries)
        self._place_on_hulls(by_id)

    def _place_on_hulls(self, by_id: dict[int, ScreenedCandidate]) -> None:
        entry_of = {e.attribute: e for e in self.entries if isinstance(e.attribute, int)}
        for candidate in self.candidates:
            # a duplicate before relaxation shares the result of the structure it matched (which may be an
            # elemental reference or a competing phase, not only another candidate)
            duplicate = candidate.status == Status.DUPLICATE and candidate.duplicate_of is not None
            entry = entry_of.get(candidate.duplicate_of if duplicate else candidate.id)
            if entry is None:
                continue
            diagram = self.diagram(candidate.chemsys)
            if isinstance(diagram, str):
                candidate.note = diagram
                continue
            if duplicate:
                candidate.energy_per_atom = entry.energy_per_atom
                original = by_id.get(candidate.duplicate_of)
                candidate.spacegroup = original.spacegroup if original else None
            candidate.formation_energy_per_atom = float(diagram.get_form_energy_per_atom(entry))
            candidate.e_above_hull = float(diagram.get_e_above_hull(entry))

    @functools.cache  # noqa: B019 - one analysis per report, cache dies with it
    def diagram(self, chemsys: str) -> PhaseDiagram | str:
        """The hull of a chemical system, or why there is none (a missing elemental reference)."""
        return self._hulls.hull(frozenset(chemsys.split("-")))

    def ranked(self) -> list[ScreenedCandidate]:
        """Most stable first; candidates without a hull position last, in enumeration order."""
        return sorted(
            self.candidates,
            key=lambda c: (
                c.e_above_hull is None,
                c.e_above_hull if c.e_above_hull is not None else 0.0,
                c.formation_energy_per_atom if c.formation_energy_per_atom is not None else 0.0,
                c.id,
            ),
        )

    def chemical_systems(self) -> list[str]:
        return sorted({c.chemsys for c in self.candidates if c.e_above_hull is not None})


class SubsystemHulls:
    """The hull of any chemical subsystem of a set of entries, the entries grouped once by element set.

    A screen over many elements touches thousands of subsystems; gathering each one's pool from the groups
    of its element subsets costs the size of that pool, where a scan of every entry per subsystem made the
    ranking of a large screen quadratic (3,000 entries, 2,272 subsystems: 19 s, nearly all in the scan).
    """

    def __init__(self, entries: Sequence[PDEntry]) -> None:
        self.entries = list(entries)
        self._groups: dict[frozenset[str], list[int]] = defaultdict(list)
        for index, entry in enumerate(self.entries):
            self._groups[frozenset(el.symbol for el in entry.composition.elements)].append(index)

    def hull(self, elements: frozenset[str]) -> PhaseDiagram | str:
        """The hull of the entries whose elements lie within ``elements``, or why there is none.

        Every element needs a relaxed elemental entry of its own: formation energies against a reference
        from elsewhere would mix potentials.
        """
        if 2 ** len(elements) <= len(self._groups):
            ordered = sorted(elements)
            within = [
                frozenset(subset)
                for size in range(1, len(ordered) + 1)
                for subset in itertools.combinations(ordered, size)
                if frozenset(subset) in self._groups
            ]
        else:
            within = [own for own in self._groups if own <= elements]
        present = {next(iter(own)) for own in within if len(own) == 1}
        missing = sorted(elements - present)
        if missing:
            return f"no relaxed elemental reference for {', '.join(missing)}: no hull"
        # the entries' own order, so a hull does not depend on how it was gathered
        indices = sorted(index for own in within for index in self._groups[own])
        return PhaseDiagram([self.entries[index] for index in indices])


def load_entries(path: Path) -> list[PDEntry]:
    """Entries (pymatgen ComputedEntry / PDEntry dicts, as a list or under 'entries') from a JSON file.

    Every failure is a ValueError naming the file and what was expected: the file is read when the config
    is validated, so a screen never runs to its end and then fails to rank.
    """
    from monty.serialization import loadfn

    expected = "a JSON list of pymatgen entries (ComputedEntry or PDEntry .as_dict()), or {'entries': [...]}"
    try:
        data = loadfn(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise ValueError(
            f"competing-phase entries file {path} cannot be read ({detail}); expected {expected}"
        ) from None
    if isinstance(data, dict) and "entries" in data:
        data = data["entries"]
    if not isinstance(data, list):
        raise ValueError(
            f"competing-phase entries file {path}: expected {expected}, found a {type(data).__name__}"
        )
    entries = []
    for index, item in enumerate(data):
        if not hasattr(item, "composition") or not hasattr(item, "energy"):
            raise ValueError(
                f"competing-phase entries file {path}: item {index} ({str(item)[:80]}) is not a pymatgen "
                f"entry (needs composition and energy); expected {expected}"
            )
        entries.append(
            PDEntry(item.composition, item.energy, name=f"{item.composition.reduced_formula} ({path.name})")
        )
    return entries
