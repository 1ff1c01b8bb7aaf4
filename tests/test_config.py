"""Bad configs are refused with a message naming the key and what is allowed, exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from globopt.cli import main
from globopt.composition import parse_composition
from globopt.config import ConfigError, RunConfig, load_config, parse_config

BASE = {"name": "t", "composition": "Cu2Au2", "potential": {"kind": "emt"}}


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def validate_cli(tmp_path: Path, data: dict | str, capsys) -> tuple[int, str]:
    code = main(["validate", str(write(tmp_path, data))])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_minimal_config_gets_documented_defaults(models_dir: Path) -> None:
    config = parse_config({"name": "nacl", "composition": "Na4Cl4"})
    assert config.mode == "random"
    assert config.composition == {"Na": 4, "Cl": 4}
    assert config.budget.evaluations == 40
    assert config.potential.model == "M3GNet-MP-2021.2.8-PES"
    assert config.workers == 1
    assert config.seed == 0


def test_composition_mapping_and_formula_agree() -> None:
    assert parse_composition({"Ti": 2, "O": 4}) == parse_composition("Ti2O4") == {"Ti": 2, "O": 4}
    assert parse_composition("NaCl") == {"Na": 1, "Cl": 1}


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"budget": {"evaluatons": 5}}, "unknown key 'budget.evaluatons' (did you mean 'evaluations'?)"),
        ({"seeed": 3}, "unknown key 'seeed' (did you mean 'seed'?)"),
        ({"budget": {"evaluations": "many"}}, "'budget.evaluations'"),
        ({"budget": {"evaluations": 0}}, "greater than 0"),
        ({"workers": 0}, "'workers'"),
        ({"mode": "annealing"}, "'mode': Input should be 'random'"),
        ({"composition": "NaXx"}, "'Xx' in formula 'NaXx' is not a chemical element"),
        ({"composition": {"Na": 4, "Qq": 4}}, "'Qq' is not a chemical element symbol"),
        ({"composition": "Na0.5Cl0.5"}, "must be a positive integer number of atoms"),
        ({"composition": {"Na": -1, "Cl": 1}}, "must be a positive integer number of atoms"),
        ({"composition": "Na300Cl300"}, "more than the 200 a search can handle"),
        ({"composition": "Na4Cl4"}, "not covered by the potential (emt); it covers: Ag Al Au"),
        ({"potential": {"kind": "ase"}}, "potential.calculator is required with kind: ase"),
        ({"relax": {"fmax": -1}}, "'relax.fmax'"),
        ({"duplicates": {"max_comparisons": 0}}, "'duplicates.max_comparisons'"),
        ({"checks": {"volume_factor_range": [5, 1]}}, "0 < low < high"),
        ({"name": "bad name/../x"}, "'name'"),
    ],
)
def test_bad_input_is_named_with_exit_code_2(tmp_path: Path, capsys, patch: dict, expected: str) -> None:
    data = {**BASE, **patch}
    code, output = validate_cli(tmp_path, data, capsys)
    assert code == 2
    assert expected in output


def test_elements_outside_m3gnet_are_refused(models_dir: Path) -> None:
    # M3GNet-MP-2021.2.8 covers H..Pu; americium is a real element it has never seen.
    with pytest.raises(ConfigError, match=r"element\(s\) Am not covered by the potential"):
        parse_config({"name": "x", "composition": "Am2O3"})
    assert parse_config({"name": "x", "composition": "Pu2O3"}).composition == {"Pu": 2, "O": 3}


def test_unknown_key_message_lists_allowed_keys(tmp_path: Path, capsys) -> None:
    code, output = validate_cli(tmp_path, {**BASE, "relax": {"steps": 10}}, capsys)
    assert code == 2
    assert "allowed here: optimizer, fmax, max_steps, extend_steps, extend_margin, pressure_gpa" in output


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "foo": 1, "workers": -2})
    assert "2 problem(s)" in str(info.value)


def test_missing_required_keys(tmp_path: Path, capsys) -> None:
    code, output = validate_cli(tmp_path, {"mode": "random"}, capsys)
    assert code == 2
    assert "'name' is required" in output and "'composition' is required" in output


def test_yaml_syntax_error_and_missing_file(tmp_path: Path, capsys) -> None:
    code, output = validate_cli(tmp_path, "name: [unclosed\n", capsys)
    assert code == 2 and "not valid YAML" in output
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_valid_config_passes_validate(tmp_path: Path, capsys) -> None:
    code, output = validate_cli(tmp_path, BASE, capsys)
    assert code == 0
    assert "valid" in output and "Cu2Au2" in output and "budget: 40 evaluations;" in output
    targeted = {**BASE, "budget": {"evaluations": 30, "target_enthalpy_per_atom": -0.02}}
    code, output = validate_cli(tmp_path, targeted, capsys)
    assert code == 0 and "budget: 30 evaluations or enthalpy <= -0.02 eV/atom;" in output
    screen = {
        "name": "s",
        "mode": "htvs",
        "potential": {"kind": "emt"},
        "htvs": {
            "templates": [{"prototype": "rock salt"}],
            "substitutions": {"Na": ["Cu"], "Cl": ["Ag"]},
            "keep_original": False,
        },
    }
    code, output = validate_cli(tmp_path, screen, capsys)
    assert code == 0 and "budget: the whole enumeration;" in output, output


def test_console_script_exit_code(tmp_path: Path) -> None:
    """The installed entry point, not just main(), returns 2 on a bad config."""
    path = write(tmp_path, {**BASE, "budget": {"evaluations": -3}})
    result = subprocess.run(
        [sys.executable, "-m", "globopt", "validate", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "'budget.evaluations'" in result.stderr


def test_bundled_examples_are_valid(models_dir: Path) -> None:
    for path in sorted(Path(__file__).resolve().parents[1].glob("runs/examples/*.yaml")):
        assert isinstance(load_config(path), RunConfig)


# -- input that used to be read silently as something else ------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("composition: Cu0Au2\n", "count of Cu is 0 in formula 'Cu0Au2'"),
        ("composition: Cu2Au2\nbudget: {evaluations: 3}\nbudget: {evaluations: 9}\n",
         "key 'budget' appears twice (lines 4 and 5)"),
        ("composition: Cu2Au2\nbudget: {evaluations: true}\n",
         "'budget.evaluations': expected an integer, got true"),
        ("composition: Cu2Au2\nrelax: {fmax: yes}\n", "'relax.fmax': expected a number, got true"),
        ("composition: Cu2Au2\nga: {operators: {heredity: true}}\n", "yes/no values for heredity"),
        ("composition: Cu2Au2\nseed: false\n", "'seed': expected an integer"),
        ("composition: Cu2Au2\npotential: {kind: emt, model: M3GNet-MatPES-PBE-v2025.1-PES}\n",
         "potential.model is used only with kind: matgl (got kind: emt"),
        ("composition: Cu2Au2\nhtvs: {templates: [{prototype: B2}]}\n", "applies to mode htvs only"),
        ("composition: Cu2Au2\npotential: {kind: ase, calculator: 'ase.calculators.emt:NoSuch'}\n",
         "potential.calculator: cannot import ASE calculator 'ase.calculators.emt:NoSuch'"),
        ("composition: Cu2Au2\npotential: {kind: ase, calculator: 'ase.build:bulk'}\n",
         "is not an ASE calculator class"),
    ],
)  # fmt: skip
def test_input_that_was_read_as_something_else_is_named(
    tmp_path: Path, capsys, text: str, expected: str
) -> None:
    header = "name: t\npotential: {kind: emt}\n" if "potential" not in text else "name: t\n"
    code, output = validate_cli(tmp_path, header + text, capsys)
    assert code == 2, output
    assert expected in output, output
    assert "Traceback" not in output


def test_configs_written_by_earlier_versions_still_load() -> None:
    """Earlier versions stored the default model under every potential kind: read as no model."""
    config = parse_config({**BASE, "potential": {"kind": "emt", "model": "M3GNet-MP-2021.2.8-PES"}})
    assert config.potential.model is None and config.potential.label == "emt"


def test_a_directory_given_as_the_config_is_named(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path)]) == 2
    assert f"config file {tmp_path} is a directory, not a YAML file" in capsys.readouterr().err
    assert main(["run", str(emt_config_in(tmp_path)), "--out", str(tmp_path / "run")]) == 0
    assert main(["validate", str(tmp_path / "run")]) == 2
    assert f"use `globopt resume {tmp_path / 'run'}`" in capsys.readouterr().err


def emt_config_in(folder: Path) -> Path:
    path = folder / "cuau.yaml"
    path.write_text(yaml.safe_dump({**BASE, "budget": {"evaluations": 1}}))
    return path


# -- the model is resolved by validate, as the run will resolve it ----------------------------------------
def test_unknown_model_is_refused_by_validate(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GLOBOPT_MODELS", str(tmp_path / "nowhere"))
    code, output = validate_cli(
        tmp_path, {"name": "t", "composition": "NaCl", "potential": {"model": "emt"}}, capsys
    )
    assert code == 2
    assert "model 'emt' was not found" in output and "write `kind: emt` under potential:" in output
    code, output = validate_cli(tmp_path, {"name": "t", "composition": "NaCl"}, capsys)
    assert code == 2
    assert "model 'M3GNet-MP-2021.2.8-PES' was not found" in output
    assert f"GLOBOPT_MODELS={tmp_path / 'nowhere'} (no such folder: {tmp_path / 'nowhere'})" in output
    assert not (tmp_path / "runs").exists()
    assert (
        main(
            ["run", str(write(tmp_path, {"name": "t", "composition": "NaCl"})), "--out", str(tmp_path / "r")]
        )
        == 2
    )
    assert not (tmp_path / "r").exists(), "a config refused before the run leaves no run directory"


def _damaged_model(models_dir: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / "models" / "M3GNet-MP-2021.2.8-PES"
    if damage == "empty folder":
        folder.mkdir(parents=True)
        return folder
    shutil.copytree(models_dir / "M3GNet-MP-2021.2.8-PES", folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    if damage == "truncated model.json":
        text = (folder / "model.json").read_text()
        (folder / "model.json").write_text(text[: len(text) // 3])
    elif damage == "truncated model.pt":
        data = (folder / "model.pt").read_bytes()
        (folder / "model.pt").write_bytes(data[: len(data) // 2])
    elif damage == "garbled state.pt":
        data = bytearray((folder / "state.pt").read_bytes())
        with zipfile.ZipFile(folder / "state.pt") as archive:
            info = max(archive.infolist(), key=lambda i: i.compress_size)
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 64
        data[start : start + 256] = b"\x00" * 256
        (folder / "state.pt").write_bytes(bytes(data))
    return folder


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("empty folder", "lacks model.json, model.pt, state.pt"),
        ("truncated model.json", "cannot read model description"),
        ("truncated model.pt", "model.pt is truncated or not a torch checkpoint"),
        ("garbled state.pt", "state.pt is damaged"),
    ],
)
def test_damaged_model_folder_is_named_by_validate_and_run(
    tmp_path: Path, models_dir: Path, monkeypatch, damage: str, expected: str
) -> None:
    folder = _damaged_model(models_dir, tmp_path, damage)
    monkeypatch.setenv("GLOBOPT_MODELS", str(folder.parent))
    path = write(tmp_path, {"name": "t", "composition": "NaCl", "budget": {"evaluations": 1}})
    for command in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "run")]):
        result = subprocess.run(
            [sys.executable, "-m", "globopt", *command], capture_output=True, text=True, timeout=600,
            env={**os.environ, "GLOBOPT_MODELS": str(folder.parent)},
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert expected in result.stderr and str(folder) in result.stderr
        assert "copy the complete checkpoint folder again" in result.stderr
    assert not (tmp_path / "run").exists()


def test_spacegroup_prior_defaults_to_frequency_except_for_chemical_systems() -> None:
    """The frequency prior is the default where it was measured (fixed composition); a chemical-system
    search keeps uniform unless the user asks for frequency, and an explicit choice is always kept."""
    assert RunConfig.model_validate(BASE).random.spacegroup_prior == "frequency"
    system = {
        "name": "t",
        "mode": "ga",
        "chemical_system": ["Cu", "Au"],
        "atoms": [1, 4],
        "potential": {"kind": "emt"},
    }
    assert RunConfig.model_validate(system).random.spacegroup_prior == "uniform"
    chosen = {**system, "random": {"spacegroup_prior": "frequency"}}
    assert RunConfig.model_validate(chosen).random.spacegroup_prior == "frequency"
    uniform = {**BASE, "random": {"spacegroup_prior": "uniform"}}
    assert RunConfig.model_validate(uniform).random.spacegroup_prior == "uniform"
