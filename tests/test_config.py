"""Bad configs are refused with a message naming the key and what is allowed, exit code 2."""

from __future__ import annotations

import subprocess
import sys
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


def test_minimal_config_gets_documented_defaults() -> None:
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
        ({"composition": "Na4Cl4"}, "not covered by the potential (potential.kind=emt"),
        ({"potential": {"kind": "ase"}}, "potential.calculator is required with kind: ase"),
        ({"relax": {"fmax": -1}}, "'relax.fmax'"),
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
