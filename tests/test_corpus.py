"""Training corpora built by the engine: library templates, alloy decorations, and the corpus collector."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from test_htvs import htvs_config

from generators.corpus import CorpusError, collect_corpus, split_of, structure_type_of
from generators.data import load_structures
from globopt.cli import main
from globopt.htvs.enumeration import Enumeration
from globopt.htvs.settings import HtvsConfig
from globopt.htvs.substitutions import alloy_decorations, probable_substitutions
from globopt.htvs.templates import Template, prototype

EMT_METALS = ["Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt"]
# every AFLOW structure type of at most 2 atoms and 2 species, decorated with the metals EMT covers
EMT_CORPUS_SCREEN = {
    "templates": [{"library": "aflow", "max_species": 2}],
    "max_atoms": 2,
    "keep_original": False,
    "elements": EMT_METALS,
    "alloys": {"elements": EMT_METALS, "max_per_template": 3},
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -- enumeration sources ----------------------------------------------------------------------------------
def test_library_templates_are_every_prototype_within_the_limits() -> None:
    library = {"templates": [{"library": "aflow", "max_species": 1}], "max_atoms": 2}
    config = HtvsConfig.model_validate({**library, "elemental_references": False})
    blocks = Enumeration(config).template_blocks
    assert len(blocks) >= 10  # fcc, bcc, hcp, diamond-like, ... of pymatgen's 288 prototypes
    for block in blocks:
        structure = block.template.structure
        assert len(structure) <= 2 and len(structure.composition.elements) == 1
        assert block.template.name.startswith("A_")  # AFLOW labels of elemental structure types
    assert "A_cF4_225_a" in {b.template.name for b in blocks}  # fcc (Cu)


def test_library_and_max_species_are_checked() -> None:
    with pytest.raises(ValueError, match="exactly one of prototype, library"):
        HtvsConfig.model_validate({"templates": [{"library": "aflow", "prototype": "B1"}]})
    with pytest.raises(ValueError, match="max_species applies only to library"):
        HtvsConfig.model_validate({"templates": [{"prototype": "B1", "max_species": 2}]})
    with pytest.raises(ValueError, match="not metals: O"):
        HtvsConfig.model_validate({"templates": [{"prototype": "B1"}], "alloys": {"elements": ["Cu", "O"]}})


def test_alloy_decorations_are_distinct_metals_fixed_by_name_and_seed() -> None:
    _, structure = prototype("L1_2")  # Cu3Au
    template = Template("L12", structure)
    first = alloy_decorations(template, EMT_METALS, 10, seed=0)
    assert first == alloy_decorations(template, EMT_METALS, 10, seed=0)
    assert first != alloy_decorations(template, EMT_METALS, 10, seed=1)
    assert len(first) == 10 and len({tuple(m.values()) for m in first}) == 10
    for mapping in first:
        assert set(mapping) == {"Au", "Cu"} and len(set(mapping.values())) == 2
        assert set(mapping.values()) <= set(EMT_METALS)
    # all 7 x 6 ordered pairs when the limit allows
    assert len(alloy_decorations(template, EMT_METALS, 100, seed=0)) == 42
    # an ionic template is not an alloy
    assert alloy_decorations(Template("rocksalt", prototype("rock salt")[1]), EMT_METALS, 10, 0) == []


def test_templates_whose_ions_the_substitution_model_lacks_get_none() -> None:
    # zinc-blende GaAs guesses As3-, which the data-mined model does not list: no substitutions, no error
    _, structure = prototype("zincblende")
    structure.replace_species({"Zn": "Ga", "S": "As"})
    assert probable_substitutions(structure, 0.001, 50) == []
    _, rocksalt = prototype("rock salt")
    only = probable_substitutions(rocksalt, 0.001, 50, elements=["Na", "K", "Cl", "Br"])
    assert only and all(set(m.values()) <= {"Na", "K", "Cl", "Br"} for m, _ in only)


def test_the_screen_element_list_bounds_every_structure() -> None:
    config = HtvsConfig.model_validate(EMT_CORPUS_SCREEN)
    enumeration = Enumeration(config)
    assert set(enumeration.elements) == set(EMT_METALS)
    seen = set()
    for block_index, block in enumerate(enumeration.blocks):
        for index in range(len(block)):
            item = enumeration.item(block_index, index)
            if item.structure is not None:
                seen |= {el.symbol for el in item.structure.composition.elements}
    assert seen == set(EMT_METALS)
    # a template whose own species are outside the list (Pa, bct) is screened only as decorated
    by_name = {b.template.name: b for b in enumeration.template_blocks}
    assert by_name["A_tI2_139_a"].template.species == ["Pa"] and len(by_name["A_tI2_139_a"].explicit) == 0
    assert len(by_name["A_tI2_139_a"]) == 3 and len(by_name["A_cF4_225_a"].explicit) == 1  # fcc Cu kept


def test_charge_neutrality_filters_ionic_decorations_but_not_intermetallics() -> None:
    screen = {"templates": [{"prototype": "L1_2"}, {"prototype": "rock salt"}], "keep_original": False,
              "substitutions": {"Na": ["Mg", "K"]}, "alloys": {"elements": ["Cu", "Au", "Ni"]},
              "charge_neutral": True}  # fmt: skip
    enumeration = Enumeration(HtvsConfig.model_validate(screen))
    l12, rocksalt = enumeration.template_blocks
    items = [l12.item(i) for i in range(len(l12))]
    # the original Cu3Au and 5 alloys (the sixth would repeat it): all metals, none filtered
    assert len(items) == 6 and all(i.structure is not None for i in items)
    assert all(i.origin.endswith(" alloy") for i in items[1:])
    verdicts = {rocksalt.item(i).origin: rocksalt.item(i).structure is not None for i in range(len(rocksalt))}
    assert verdicts == {"htvs:AB_cF8_225_a_b:Na>Mg": False, "htvs:AB_cF8_225_a_b:Na>K": True}  # MgCl, KCl


# -- the collector ----------------------------------------------------------------------------------------
def test_structure_types_and_splits_follow_whole_templates() -> None:
    assert structure_type_of("htvs:AB_cF8_225_a_b:Na>K p=0.1") == ("AB_cF8_225_a_b", "Na>K")
    assert structure_type_of("reference:Cu") == ("element:Cu", "")
    assert structure_type_of("ga:heredity") == ("search", "")
    types = [f"T{i}" for i in range(400)]
    splits = [split_of(t, 0, 0.1, 0.1, ()) for t in types]
    assert 20 < splits.count("test") < 60 and 20 < splits.count("val") < 60
    assert splits == [split_of(t, 0, 0.1, 0.1, ()) for t in types]  # fixed by the name
    assert (
        split_of("element:Cu", 0, 0.99, 0.0, ()) == "train" and split_of("T1", 0, 0.0, 0.0, ["T1"]) == "test"
    )


@pytest.fixture(scope="module")
def emt_screen(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus_screen")
    config = htvs_config(folder, "emt_corpus", EMT_CORPUS_SCREEN)
    out = folder / "run"
    assert main(["run", str(config), "--out", str(out)]) == 0
    return out


def test_a_corpus_from_a_screen_is_filtered_split_by_type_and_trainable(emt_screen: Path, tmp_path) -> None:
    out = tmp_path / "corpus"
    argv = ["generator", "corpus", str(emt_screen), "--out", str(out), "--name", "emt"]
    assert main([*argv, "--window", "0.05", "--test-fraction", "0.3", "--val-fraction", "0.2"]) == 0
    rows = read_csv(out / "corpus.csv")
    manifest = json.loads((out / "manifest.json").read_text())
    ranked = read_csv(emt_screen / "ranked.csv")
    assert rows and manifest["rows"]["all"] == len(rows) and manifest["potential"].startswith("emt")
    assert manifest["candidates_read"] >= len(rows)
    # converged minima only, all within the window of their composition's lowest energy
    relaxed_ids = {int(r["id"]) for r in ranked if r["status"] == "relaxed"}
    lowest: dict[str, float] = {}
    for row in rows:
        assert float(row["e_above_composition_min"]) <= 0.05 + 1e-9
        assert row["e_above_hull"] == "" or float(row["e_above_hull"]) >= -1e-6
        if row["structure_type"].startswith("A"):
            assert int(row["source_id"]) in relaxed_ids
        formula = row["formula"]
        lowest[formula] = min(lowest.get(formula, 1e9), float(row["energy_per_atom"]))
    assert any(float(r["e_above_hull"] or 1) < 1e-6 for r in rows)  # the elements are on their hulls
    # one row per minimum
    matcher = StructureMatcher()
    for formula in lowest:
        same = [Structure.from_str(r["cif"], fmt="cif") for r in rows if r["formula"] == formula]
        for i in range(len(same)):
            assert not any(matcher.fit(same[i], same[j]) for j in range(i))
    # a structure type lives in one split only; elements and searches always train
    split_of_type: dict[str, set[str]] = {}
    for row in rows:
        split_of_type.setdefault(row["structure_type"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of_type.values())
    assert all(r["split"] == "train" for r in rows if r["structure_type"].startswith("element:"))
    held_out = manifest["structure_types"]["test"]
    assert held_out and set(held_out) == {r["structure_type"] for r in rows if r["split"] == "test"}
    # the split files are the corpus rows, and the generators read them as they read CDVAE files
    total = 0
    for split in ("train", "val", "test"):
        part = read_csv(out / f"{split}.csv")
        assert all(r["split"] == split for r in part)
        total += len(part)
    assert total == len(rows)
    structures, labels = load_structures(out / "train.csv")
    assert len(structures) == manifest["rows"]["train"] and labels[0].startswith("emt-")

    # collecting again gives the same data set; a folder that is not a corpus is never written into
    assert main([*argv, "--window", "0.05", "--test-fraction", "0.3", "--val-fraction", "0.2"]) == 0
    assert [r["cif"] for r in read_csv(out / "corpus.csv")] == [r["cif"] for r in rows]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="holds other files"):
        collect_corpus([emt_screen], other)
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_corpus_mistakes_are_named(emt_screen: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "c"
    assert main(["generator", "corpus", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert main(["generator", "corpus", str(emt_screen), "--out", str(out), "--hold-out", "XYZ"]) == 2
    assert "--hold-out names structure types no row has: XYZ" in capsys.readouterr().err
    assert main(["generator", "corpus", str(emt_screen), "--out", str(out), "--test-fraction", "1.5"]) == 2
    assert "fractions below 1" in capsys.readouterr().err
