"""Generative models (generators/): representation invariances, training, checkpoints, CLI, GA seeding."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_results, write_config
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from generators.checkpoint import CheckpointError, load_checkpoint, shipped_checkpoint
from generators.diffusion import CrystalDiffusion, DiffusionConfig, wrapped_normal_score
from generators.metrics import structurally_valid
from generators.networks import PeriodicBackbone
from generators.representation import Crystal, CrystalBatch, LatticeScaler
from generators.sample import StructureGenerator
from generators.train import crystals_from
from generators.wgan import CrystalWGAN, WGANConfig
from globopt.cli import main
from globopt.config import ConfigError, parse_config

PEROV_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "perov_5" / "val.csv"
TINY = {"hidden": 32, "layers": 2, "n_freq": 4}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small models on a shared 2-core machine: one thread is faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def perov_slice(tmp_path_factory) -> Path:
    """The first 24 rows of Perov-5 val as a small CDVAE csv (skips when the shared data is absent)."""
    if not PEROV_VAL.is_file():
        pytest.skip(f"Perov-5 data not found at {PEROV_VAL} (see ../shared/data/README.md)")
    lines, rows, row = [], 0, []
    with open(PEROV_VAL) as handle:
        header = handle.readline()
        for line in handle:
            row.append(line)
            if line.rstrip().endswith(tuple("0123456789")) and line.count(",") >= 5:  # last line of a row
                lines.extend(row)
                row = []
                rows += 1
                if rows == 24:
                    break
    path = tmp_path_factory.mktemp("data") / "perov_slice.csv"
    path.write_text(header + "".join(lines))
    return path


def _rock_salt() -> Structure:
    return Structure(Lattice.cubic(5.6), ["Na"] * 4 + ["Cl"] * 4, [
        [0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
        [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5],
    ])  # fmt: skip


def _outputs(net: PeriodicBackbone, batch: CrystalBatch, frac: torch.Tensor, cond: torch.Tensor):
    return net(batch.numbers, batch.mask, frac, batch.lattice, cond)


def test_crystal_round_trip_and_lattice_scaler() -> None:
    structure = _rock_salt()
    crystal = Crystal.from_structure(structure)
    assert crystal.frac.min() >= 0 and crystal.frac.max() < 1
    assert StructureMatcher().fit(crystal.to_structure(), structure)
    params, n = np.array([crystal.params, [3.0, 4.0, 5.0, 80.0, 95.0, 100.0]]), np.array([8, 8])
    scaler = LatticeScaler.fit(params, n)
    np.testing.assert_allclose(scaler.decode(scaler.encode(params, n), n), params, atol=1e-6)


def test_backbone_is_periodic_translation_invariant_and_permutation_equivariant() -> None:
    torch.manual_seed(0)
    net = PeriodicBackbone(hidden=32, layers=2, n_freq=4, cond_dim=8, node_out=3, graph_out=6).double()
    batch = CrystalBatch.for_compositions([[11] * 3 + [17] * 3, [6] * 4])
    batch.lattice = torch.randn(2, 6, dtype=torch.float64)
    frac = torch.rand(2, 6, 3, dtype=torch.float64) * batch.mask[..., None]
    cond = torch.randn(2, 8, dtype=torch.float64)
    node, graph = _outputs(net, batch, frac, cond)
    # lattice translation of single atoms (periodic wrap) and a shift of the origin change nothing
    shifted = frac + torch.randint(-2, 3, frac.shape).double() + torch.tensor([0.31, -0.12, 0.77])
    node2, graph2 = _outputs(net, batch, shifted * batch.mask[..., None], cond)
    torch.testing.assert_close(node2, node)
    torch.testing.assert_close(graph2, graph)
    # permuting the atoms permutes per-atom outputs and leaves the crystal output unchanged
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    permuted = CrystalBatch(
        batch.numbers[:1, perm], batch.frac[:1], batch.lattice[:1], batch.mask[:1], batch.n_atoms[:1]
    )
    node3, graph3 = _outputs(net, permuted, frac[:1, perm], cond[:1])
    torch.testing.assert_close(node3, node[:1, perm])
    torch.testing.assert_close(graph3, graph[:1])
    # padding atoms get no output
    assert torch.all(node[1, 4:] == 0)


def test_wrapped_normal_score_is_the_derivative_of_the_wrapped_density() -> None:
    sigma = torch.tensor(0.3, dtype=torch.float64)
    x = torch.linspace(-0.49, 0.49, 25, dtype=torch.float64)

    def log_density(values: torch.Tensor) -> torch.Tensor:
        k = torch.arange(-6, 7, dtype=torch.float64)
        return torch.logsumexp(-((values[:, None] + k) ** 2) / (2 * sigma**2), dim=1)

    h = 1e-6
    numeric = (log_density(x + h) - log_density(x - h)) / (2 * h)
    analytic = wrapped_normal_score(x, sigma.expand_as(x))
    torch.testing.assert_close(analytic, numeric, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wrapped_normal_score(x + 1.0, sigma.expand_as(x)), analytic, atol=1e-6, rtol=0)


def test_tiny_training_reduces_the_loss_of_both_models(perov_slice: Path) -> None:
    torch.manual_seed(0)
    crystals = crystals_from(perov_slice)
    scaler = LatticeScaler.fit(
        np.stack([c.params for c in crystals]), np.array([len(c.numbers) for c in crystals])
    )
    batch = CrystalBatch.collate(crystals, scaler)
    model = CrystalDiffusion(DiffusionConfig(**TINY, timesteps=100))
    optimizers = model.make_optimizers(3e-3)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(model.loss(batch, torch.Generator().manual_seed(123)))

    before = held_out_loss()
    for step in range(60):
        model.training_step(batch, optimizers, torch.Generator().manual_seed(step))
    assert held_out_loss() < 0.85 * before
    gan = CrystalWGAN(WGANConfig(**TINY, critic_steps=2))
    losses = gan.training_step(batch, gan.make_optimizers(1e-4), torch.Generator().manual_seed(0))
    assert all(math.isfinite(v) for v in losses.values())
    sample = gan.sample(CrystalBatch.for_compositions([[8, 8, 8, 22, 38]]), torch.Generator().manual_seed(0))
    assert sample.frac.shape == (1, 5, 3) and sample.lattice.shape == (1, 6)


def test_shipped_checkpoint_samples_valid_structures_of_the_requested_composition() -> None:
    checkpoint = load_checkpoint("default")
    assert checkpoint.kind == "diffusion" and "perov_5" in checkpoint.dataset["path"]
    assert {"Sr", "Ti", "O"} <= set(checkpoint.vocabulary)
    generator = StructureGenerator(checkpoint)
    structures = generator.generate_composition("Sr1Ti1O3", 6, seed=1, steps=200)
    assert [s.composition.reduced_formula for s in structures] == ["SrTiO3"] * 6
    assert sum(structurally_valid(s) for s in structures) >= 5
    # sampling is a pure function of the seed (resume-exact seeding relies on it)
    first, again = (generator.generate_composition("Sr1Ti1O3", 2, seed=5, steps=20) for _ in range(2))
    assert all(np.allclose(a.frac_coords, b.frac_coords) for a, b in zip(first, again, strict=True))


def test_cli_trains_resumes_samples_and_evaluates(perov_slice: Path, tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "tiny.pt"
    common = ["--data", str(perov_slice), "--out", str(checkpoint), "--hidden", "32", "--layers", "1"]
    assert main(["generator", "train", *common, "--epochs", "1", "--batch-size", "8"]) == 0
    assert load_checkpoint(checkpoint).training["epochs"] == 1
    assert main(["generator", "train", *common, "--epochs", "2", "--batch-size", "8", "--resume"]) == 0
    resumed = load_checkpoint(checkpoint)
    assert resumed.training["epochs"] == 2 and len(resumed.training["history"]) == 2
    assert resumed.optimizer_states  # resumable: the optimiser state travels with the weights
    out = tmp_path / "cifs"
    assert main(["generator", "sample", "--checkpoint", str(checkpoint), "--composition", "Na4Cl4",
                 "--n", "3", "--out", str(out)]) == 0  # fmt: skip
    cifs = sorted(out.glob("*.cif"))
    assert len(cifs) == 3
    assert Structure.from_file(cifs[0]).composition.formula.replace(" ", "") == "Na4Cl4"
    # a folder of CIFs is a data set too; the WGAN trains on it
    gan = tmp_path / "gan.pt"
    assert main(["generator", "train", "--data", str(out), "--out", str(gan), "--kind", "wgan",
                 "--epochs", "1", "--hidden", "16", "--layers", "1"]) == 0  # fmt: skip
    assert load_checkpoint(gan).kind == "wgan"
    report = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["generator", "evaluate", "--checkpoint", str(gan), "--data", str(perov_slice),
                 "--limit", "4", "--out", str(report)]) == 0  # fmt: skip
    result = json.loads(report.read_text())
    assert (
        result["structures"] == 4 and 0 <= result["match_rate"] <= 1 and result["structures_per_second"] > 0
    )
    assert result["composition_kept"] == 1.0


def test_supercell_training_and_fine_tuning(perov_slice: Path, tmp_path: Path, capsys) -> None:
    """--supercells adds a doubled copy of every cell; --init starts from a checkpoint's weights and lattice
    standardisation (a model of 5-atom cells fine-tuned to also know 10-atom ones)."""
    doubled = crystals_from(perov_slice, supercells=(2,), seed=0)
    assert len(doubled) == 48
    assert sorted({len(c.numbers) for c in doubled}) == [5, 10]
    base, tuned = tmp_path / "base.pt", tmp_path / "tuned.pt"
    common = ["--data", str(perov_slice), "--hidden", "32", "--layers", "1", "--batch-size", "8"]
    assert main(["generator", "train", *common, "--out", str(base), "--epochs", "1"]) == 0
    assert main(["generator", "train", *common, "--out", str(tuned), "--epochs", "1", "--init", str(base),
                 "--supercells", "2"]) == 0  # fmt: skip
    start, result = load_checkpoint(base), load_checkpoint(tuned)
    assert result.dataset["structures"] == 48 and result.dataset["max_atoms"] == 10
    assert result.dataset["supercells"] == [2] and result.training["init"] == str(base)
    assert np.allclose(result.scaler.mean, start.scaler.mean) and np.allclose(
        result.scaler.std, start.scaler.std
    )
    changed = [k for k in start.model_state if not torch.equal(start.model_state[k], result.model_state[k])]
    assert changed  # trained further, from the same architecture
    capsys.readouterr()
    assert main(["generator", "train", *common, "--out", str(tuned), "--epochs", "2", "--init", str(base),
                 "--resume"]) == 2  # fmt: skip
    assert "use one" in capsys.readouterr().err
    assert main(["generator", "train", *common, "--out", str(tuned), "--supercells", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_ase_database_is_a_data_set(tmp_path: Path) -> None:
    from ase.build import bulk
    from ase.db import connect

    from generators.data import load_structures

    with connect(tmp_path / "set.db") as db:
        db.write(bulk("Cu", "fcc", a=3.6, cubic=True))
        db.write(bulk("NaCl", "rocksalt", a=5.6))
    structures, labels = load_structures(tmp_path / "set.db")
    assert [s.composition.reduced_formula for s in structures] == ["Cu", "NaCl"] and labels == ["1", "2"]


def test_corrupt_or_foreign_checkpoint_gives_a_clear_error(tmp_path: Path, capsys) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(shipped_checkpoint().read_bytes()[:5000])
    with pytest.raises(
        CheckpointError, match=r"corrupt\.pt: cannot read the checkpoint.*expected a globopt-generator"
    ):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not a generator checkpoint"):
        load_checkpoint(foreign)
    code = main(["generator", "sample", "--checkpoint", str(corrupt), "--composition", "Na4Cl4", "--out",
                 str(tmp_path / "x")])  # fmt: skip
    assert code == 2
    assert "corrupt.pt" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_sample_and_train_name_every_bad_argument_and_overwrite_nothing(tmp_path: Path, capsys) -> None:
    def error(*args: str) -> str:
        assert main(["generator", *args]) == 2, args
        return capsys.readouterr().err

    out = tmp_path / "cifs"
    shipped = "diffusion_carbon24.pt, diffusion_perov5.pt, diffusion_perov5_sc2.pt, wgan_perov5.pt"
    assert f"one of the shipped checkpoints: {shipped}" in error(
        "sample", "--checkpoint", "nope", "--composition", "Na4Cl4", "--out", str(out)
    )
    sample = ["sample", "--checkpoint", "wgan_perov5.pt", "--composition", "Na1Cl1", "--n", "1"]
    assert main(["generator", *sample, "--out", str(out)]) == 0
    assert "element(s) Md (Z=101) cannot be generated" in error(
        "sample", "--composition", "Na4Md4", "--out", str(tmp_path / "md")
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert f"--out {a_file} is a file" in error("sample", "--composition", "Na4Cl4", "--out", str(a_file))
    assert a_file.read_text() == "keep"
    written = (out / "Na1Cl1_000.cif").read_bytes()
    message = error("sample", "--checkpoint", "wgan_perov5.pt", "--composition", "Na1Cl1", "--out", str(out))
    assert "already holds Na1Cl1_000.cif" in message
    assert (out / "Na1Cl1_000.cif").read_bytes() == written
    checkpoint = tmp_path / "trained.pt"
    checkpoint.write_bytes(b"a trained model")
    message = error("train", "--data", str(tmp_path), "--out", str(checkpoint))
    assert f"--out {checkpoint} already exists" in message and "--resume" in message
    assert checkpoint.read_bytes() == b"a trained model"
    with pytest.raises(ConfigError, match=r"describe elements up to Z=100, not Md"):
        parse_config({"name": "x", "composition": "Md1O1", "potential": {"kind": "ase",
                      "calculator": "ase.calculators.emt:EMT"}, "mode": "ga",
                      "initial_population": {"generator": "default"}})  # fmt: skip


def test_initial_population_config_is_validated(tmp_path: Path) -> None:
    base = {"name": "x", "composition": "Ni1Pt1O3", "potential": {"kind": "emt"}}
    with pytest.raises(ConfigError, match=r"initial_population\.generator.*not found"):
        parse_config({**base, "mode": "ga", "initial_population": {"generator": str(tmp_path / "no.pt")}})
    with pytest.raises(ConfigError, match=r"initial_population\.fraction"):
        parse_config({**base, "mode": "ga", "initial_population": {"generator": "default", "fraction": 1.5}})
    with pytest.raises(ConfigError, match="mode ga or pso"):
        parse_config({**base, "mode": "random", "initial_population": {"generator": "default"}})
    config = parse_config({**base, "mode": "pso", "initial_population": {"generator": "default"}})
    assert config.initial_population.fraction == 0.5


SEEDED = {"generator": "default", "fraction": 0.5, "sampling_steps": 100}


def _seeded_ga(folder: Path, evaluations: int, out: Path, *flags: str) -> int:
    config = write_config(
        folder, name="seeded", composition="Ni1Pt1O3", seed=3, mode="ga", budget={"evaluations": evaluations},
        potential={"kind": "emt"}, relax={"max_steps": 40}, ga={"population_size": 4, "initial_random": 4},
        initial_population=SEEDED,
    )  # fmt: skip
    return main(["run", str(config), "--out", str(out), *flags])


def test_generator_seeded_ga_records_origins_and_resumes_exactly(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert _seeded_ga(tmp_path, 5, straight) == 0
    split = tmp_path / "split"
    assert _seeded_ga(tmp_path, 1, split) == 0  # stops with one stored seed not yet used
    assert _seeded_ga(tmp_path, 5, split, "--resume") == 0

    def sequence(run: Path) -> list[tuple[str, str, str]]:
        return [(r["origin"], r["status"], r["energy_per_atom"]) for r in read_results(run)]

    origins = [origin for origin, _, _ in sequence(straight)]
    assert origins[:2] == ["generator:diffusion"] * 2  # half of the 4 initial structures
    assert not any(o.startswith("generator:") for o in origins[2:])
    assert sequence(split) == sequence(straight)
    db = sqlite3.connect(split / "archive.sqlite")
    state = json.loads(db.execute("SELECT value FROM search_state").fetchone()[0])
    db.close()
    assert state["generator_seeds"]["used"] == 2 and len(state["generator_seeds"]["seeds"]) == 2


def test_generator_seeded_pso_records_origins(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, name="pso", composition="Ni1Pt1O3", seed=3, mode="pso", budget={"evaluations": 2},
        potential={"kind": "emt"}, relax={"max_steps": 40}, pso={"swarm_size": 4}, initial_population=SEEDED,
    )  # fmt: skip
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    origins = [r["origin"] for r in read_results(tmp_path / "run")]
    assert origins == ["generator:diffusion"] * 2  # half of the 4 particles of generation 0, proposed first
