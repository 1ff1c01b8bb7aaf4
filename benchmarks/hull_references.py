"""Reference convex hulls of binary systems: textbook prototypes of their known compounds, relaxed with the
potential a search uses, so a variable-composition search can be scored against the hull the potential
itself predicts (benchmarks/hull_search.py).

    GLOBOPT_MODELS=../shared/models .venv/bin/python benchmarks/hull_references.py --systems Al-Ni Ti-Al

Each compound is built from an AFLOW prototype of pymatgen's library (its species replaced by the system's
elements), scaled to the composition-weighted volume of the relaxed elements, and relaxed with cell and
positions at fmax 0.01 eV/Å. Each structure is relaxed twice, as built and with a 0.05 Å rattle, and the
lower result is kept (a symmetric prototype can sit on a saddle of the potential). The output JSON lists
every structure with its energy per atom, formation energy, energy above the hull and whether it fits in a
search's largest cell. With ``--potential emt`` the same script gives the EMT hull of Cu-Au used by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Structure

# (label, AFLOW prototype, prototype species -> element); the elements come from globopt's bundled
# elemental references (ASE's dcdft set), relaxed the same way.
SYSTEMS: dict[str, list[tuple[str, str, dict[str, str]]]] = {
    "Al-Ni": [
        ("AlNi3 L1_2", "AB3_cP4_221_a_c", {"Cu": "Ni", "Au": "Al"}),
        ("AlNi B2", "AB_cP2_221_b_a", {"Cs": "Al", "Cl": "Ni"}),
        ("Al3Ni2 D5_13", "A3B2_hP5_164_ad_d", {"Al": "Al", "Ni": "Ni"}),
        ("Al3Ni5 Ga3Pt5", "A3B5_oC16_65_ah_bej", {"Ga": "Al", "Pt": "Ni"}),
        ("Al3Ni D0_11", "AB3_oP16_62_c_cd", {"Fe": "Al", "C": "Ni"}),
        ("Al3Ni L1_2", "AB3_cP4_221_a_c", {"Cu": "Al", "Au": "Ni"}),
        ("Al3Ni D0_22", "A3B_tI8_139_bd_a", {"Ti": "Ni", "Al": "Al"}),
        ("AlNi L1_0", "AB_tP2_123_a_d", {"Cu": "Al", "Au": "Ni"}),
        ("AlNi3 D0_19", "A3B_hP8_194_h_c", {"Ni": "Ni", "Sn": "Al"}),
        ("AlNi2 C11b", "AB2_tI6_139_a_e", {"Mo": "Al", "Si": "Ni"}),
        ("Al2Ni C11b", "AB2_tI6_139_a_e", {"Mo": "Ni", "Si": "Al"}),
    ],
    "Ti-Al": [
        ("Ti3Al D0_19", "A3B_hP8_194_h_c", {"Ni": "Ti", "Sn": "Al"}),
        ("TiAl L1_0", "AB_tP2_123_a_d", {"Cu": "Ti", "Au": "Al"}),
        ("TiAl3 D0_22", "A3B_tI8_139_bd_a", {"Ti": "Ti", "Al": "Al"}),
        ("TiAl3 L1_2", "AB3_cP4_221_a_c", {"Cu": "Al", "Au": "Ti"}),
        ("TiAl2 C11b", "AB2_tI6_139_a_e", {"Mo": "Ti", "Si": "Al"}),
        ("TiAl B2", "AB_cP2_221_b_a", {"Cs": "Ti", "Cl": "Al"}),
        ("Ti3Al L1_2", "AB3_cP4_221_a_c", {"Cu": "Ti", "Au": "Al"}),
        ("Ti2Al C11b", "AB2_tI6_139_a_e", {"Mo": "Al", "Si": "Ti"}),
        ("TiAl3 CdPt3", "AB3_oC8_65_a_bf", {"Cd": "Ti", "Pt": "Al"}),
    ],
    "Cu-Au": [
        ("CuAu L1_0", "AB_tP2_123_a_d", {"Cu": "Cu", "Au": "Au"}),
        ("Cu3Au L1_2", "AB3_cP4_221_a_c", {"Cu": "Cu", "Au": "Au"}),
        ("CuAu3 L1_2", "AB3_cP4_221_a_c", {"Cu": "Au", "Au": "Cu"}),
        ("CuAu B2", "AB_cP2_221_b_a", {"Cs": "Cu", "Cl": "Au"}),
    ],
    "Ni-Pt": [
        ("Ni3Pt L1_2", "AB3_cP4_221_a_c", {"Cu": "Ni", "Au": "Pt"}),
        ("NiPt L1_0", "AB_tP2_123_a_d", {"Cu": "Ni", "Au": "Pt"}),
        ("NiPt3 L1_2", "AB3_cP4_221_a_c", {"Cu": "Pt", "Au": "Ni"}),
        ("NiPt B2", "AB_cP2_221_b_a", {"Cs": "Ni", "Cl": "Pt"}),
    ],
}
POTENTIALS = {
    "m3gnet": {"kind": "matgl", "model": "M3GNet-MP-2021.2.8-PES"},
    "emt": {"kind": "emt", "model": ""},
}
FMAX, MAX_STEPS, RATTLE = 0.01, 1000, 0.05


@dataclass
class Relaxed:
    label: str
    structure: Structure
    energy_per_atom: float
    spacegroup: str | None


def build(prototype_name: str, mapping: dict[str, str], volume_per_atom: dict[str, float]) -> Structure:
    """The prototype with its species replaced, scaled to the composition-weighted elemental volume."""
    from globopt.htvs.templates import prototype

    _, structure = prototype(prototype_name)
    structure.replace_species(mapping)
    amounts = structure.composition.get_el_amt_dict()
    target = sum(n * volume_per_atom[el] for el, n in amounts.items())
    structure.scale_lattice(target)
    return structure


def relax_best(structure: Structure, label: str, potential: dict) -> Relaxed:
    """The lower of the relaxation as built and the relaxation of a rattled copy."""
    from globopt.evaluator.evaluate import spacegroup_of
    from globopt.scoreboard.reference import relax_known

    results = []
    rattled = structure.copy()
    rng = np.random.default_rng(0)
    for site_index in range(len(rattled)):
        rattled.translate_sites([site_index], rng.normal(0, RATTLE, 3), frac_coords=False)
    for start in (structure, rattled):
        try:
            results.append(relax_known(start, label, potential, FMAX, MAX_STEPS))
        except RuntimeError as exc:
            print(f"  {label}: {exc}")
    if not results:
        raise RuntimeError(f"{label}: no relaxation succeeded")
    best = min(results, key=lambda r: r.energy_per_atom)
    return Relaxed(label, best.structure, best.energy_per_atom, spacegroup_of(best.structure, 0.1)[0])


def reference_hull(system: str, potential_name: str, max_atoms: int) -> dict:
    from globopt.htvs.references import elemental_reference

    potential = POTENTIALS[potential_name]
    elements = system.split("-")
    relaxed: list[Relaxed] = []
    volume = {}
    for element in elements:
        result = relax_best(elemental_reference(element), f"{element} (reference)", potential)
        volume[element] = result.structure.volume / len(result.structure)
        relaxed.append(result)
        print(f"  {result.label:18s} {result.energy_per_atom:9.4f} eV/atom  {result.spacegroup}", flush=True)
    for label, name, mapping in SYSTEMS[system]:
        result = relax_best(build(name, mapping, volume), label, potential)
        relaxed.append(result)
        print(f"  {label:18s} {result.energy_per_atom:9.4f} eV/atom  {result.spacegroup}", flush=True)
    entries = [
        PDEntry(r.structure.composition, r.energy_per_atom * len(r.structure), name=r.label) for r in relaxed
    ]
    diagram = PhaseDiagram(entries)
    rows = []
    for r, entry in zip(relaxed, entries, strict=True):
        rows.append(
            {
                "label": r.label,
                "formula": r.structure.composition.reduced_formula,
                "n_atoms": len(r.structure),
                "primitive_atoms": len(r.structure.get_primitive_structure()),
                "fits_search": len(r.structure.get_primitive_structure()) <= max_atoms,
                "energy_per_atom": r.energy_per_atom,
                "formation_energy_per_atom": float(diagram.get_form_energy_per_atom(entry)),
                "e_above_hull": float(diagram.get_e_above_hull(entry)),
                "spacegroup": r.spacegroup,
                "structure": r.structure.as_dict(),
            }
        )
    return {"system": system, "potential": potential, "elements": elements, "phases": rows}


def stable_phases(reference: dict, tolerance: float = 1e-6) -> list[dict]:
    """The reference's compounds (two elements) on its hull, the lowest one per composition (two prototypes
    that relax into the same structure, like L1_0 and B2 AlNi, tie)."""
    lowest: dict[str, dict] = {}
    for p in reference["phases"]:
        if p["e_above_hull"] > tolerance or len(Composition(p["formula"]).elements) < 2:
            continue
        if p["formula"] not in lowest or p["energy_per_atom"] < lowest[p["formula"]]["energy_per_atom"]:
            lowest[p["formula"]] = p
    return list(lowest.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", nargs="+", default=["Al-Ni", "Ti-Al"], choices=sorted(SYSTEMS))
    parser.add_argument("--potential", default="m3gnet", choices=sorted(POTENTIALS))
    parser.add_argument(
        "--max-atoms", type=int, default=8, help="largest cell of the search (for fits_search)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hull_references")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for system in args.systems:
        started = time.process_time()
        print(f"{system} ({args.potential})", flush=True)
        reference = reference_hull(system, args.potential, args.max_atoms)
        path = args.out / f"{system}_{args.potential}.json"
        path.write_text(json.dumps(reference, indent=1))
        print(f"  CPU {time.process_time() - started:.0f} s; wrote {path}")
        for p in sorted(reference["phases"], key=lambda p: p["e_above_hull"]):
            print(
                f"    {p['label']:18s} {p['formula']:8s} dHf {p['formation_energy_per_atom']:8.4f} "
                f"e_hull {p['e_above_hull']:7.4f} {p['spacegroup']}"
            )


if __name__ == "__main__":
    main()
