"""The run directory: config copy, archive, lock, results table and best structures.

Layout of ``runs/<name>/``::

    config.yaml      the validated config the run uses (resume reads it from here)
    archive.sqlite   every candidate and the search state (the only source of truth)
    run.lock         held by the process writing this run; released by the OS when it dies
    globopt.log      plain log lines
    results.csv      one row per candidate, derived from the archive
    best/            lowest-energy unique structures as CIF, best first
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pymatgen.io.cif import CifWriter

from globopt.archive import Archive, CandidateRecord
from globopt.config import ConfigError, RunConfig, load_config
from globopt.objectives import objective_scores, pareto_front
from globopt.structure_codec import structure_from_json

RESULT_COLUMNS = [
    "id",
    "status",
    "origin",
    "formula",
    "n_atoms",
    "energy_per_atom",
    "enthalpy_per_atom",
    "spacegroup",
    "spacegroup_number",
    "volume_per_atom",
    "n_steps",
    "n_force_calls",
    "seconds",
    "potential_seconds",
    "duplicate_of",
    "attempts",
    "worker",
    "parents",
    "reason",
    "objectives",
    "pareto_front",
]

# Config keys that may change between a run and its resume without invalidating what was computed.
RESUMABLE_CHANGES = {"budget", "workers", "output"}


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists, locked, missing, incompatible config)."""


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.config_path = path / "config.yaml"
        self.archive_path = path / "archive.sqlite"
        self.lock_path = path / "run.lock"
        self.log_path = path / "globopt.log"
        self.results_path = path / "results.csv"
        self.best_path = path / "best"
        self._lock_handle = None
        self._cif_cache: dict[int, tuple[str, str]] = {}

    # -- lifecycle -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config: RunConfig) -> RunDirectory:
        run = cls(path)
        if run.archive_path.exists():
            raise RunDirError(
                f"{path} already holds a run; continue it with `globopt resume {path}` "
                f"(or `globopt run CONFIG --resume`), or choose another directory with --out"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(
                f"cannot create the run directory {path} ({exc}); choose another with --out"
            ) from exc
        run.acquire_lock()
        _atomic_write(run.config_path, config.to_yaml())
        return run

    @classmethod
    def open_existing(cls, path: Path, new_config: RunConfig | None = None) -> tuple[RunDirectory, RunConfig]:
        """Open a run for resuming; a new config may change only budget, workers and output."""
        run = cls(path)
        if not run.archive_path.exists() or not run.config_path.exists():
            raise RunDirError(f"{path} is not a globopt run directory (no archive.sqlite / config.yaml)")
        try:
            stored = load_config(run.config_path)
        except ConfigError as exc:
            raise RunDirError(f"the stored config of {path} is no longer valid:\n{exc}") from exc
        config = stored
        if new_config is not None:
            old, new = stored.model_dump(), new_config.model_dump()
            changed = sorted(k for k in old if old[k] != new[k] and k not in RESUMABLE_CHANGES)
            if changed:
                raise RunDirError(
                    f"cannot resume {path} with a config that changes {', '.join(changed)}: "
                    f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume;"
                    " start a new run with --out"
                )
            config = new_config
        run.acquire_lock()
        if new_config is not None:
            _atomic_write(run.config_path, config.to_yaml())
        return run, config

    def acquire_lock(self) -> None:
        try:
            handle = open(self.lock_path, "a+")  # noqa: SIM115 - held open for the life of the run
        except OSError as exc:
            raise RunDirError(
                f"cannot write to the run directory {self.path} ({exc}); a run needs it writable "
                f"(check permissions and free space), or choose another directory with --out"
            ) from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(
                f"{self.path} is being written by {holder}; two processes cannot share a run"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        self._lock_handle = handle

    def release_lock(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def open_archive(self) -> Archive:
        return Archive(self.archive_path)

    # -- derived outputs -----------------------------------------------------------------------------
    def append_result(self, archive: Archive, candidate_id: int) -> None:
        """Add one row to results.csv; rewrite_results() repairs anything a kill left out."""
        record = archive.record(candidate_id)
        new_file = not self.results_path.exists()
        with open(self.results_path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new_file:
                writer.writerow(RESULT_COLUMNS)
            writer.writerow(_csv_row(record))

    def rewrite_results(self, archive: Archive, objectives: Sequence[Any] = ()) -> None:
        """Regenerate results.csv from the archive (finished candidates only), atomically.

        With extra objectives, ``pareto_front`` marks the non-dominated unique relaxed structures.
        """
        front = _pareto_ids(archive, objectives) if objectives else set()
        tmp = self.results_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(RESULT_COLUMNS)
            for record in archive.finished():
                on_front = "" if not objectives or record.status != "relaxed" else int(record.id in front)
                writer.writerow(_csv_row(record, on_front))
        os.replace(tmp, self.results_path)

    def write_best(self, archive: Archive, n_best: int) -> list[Path]:
        """Replace best/ with the current lowest-energy unique structures (best first: 001_...)."""
        rows = archive.best_unique(n_best)
        staging = self.path / "best.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        written = []
        for rank, record in enumerate(rows, start=1):
            formula, cif = self._symmetrized_cif(record.id, record.relaxed_json)
            sg = (record.spacegroup or "P1").replace("/", "_")
            name = f"{rank:03d}_{formula}_{sg}_id{record.id}.cif"
            (staging / name).write_text(cif)
            written.append(self.best_path / name)
        old = self.path / "best.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.best_path.exists():
            os.replace(self.best_path, old)
        os.replace(staging, self.best_path)
        shutil.rmtree(old, ignore_errors=True)
        return written

    def _symmetrized_cif(self, candidate_id: int, relaxed_json: str) -> tuple[str, str]:
        """(reduced formula, CIF text) of a relaxed structure, kept for the rest of the session.

        best/ is rewritten at every new best; the symmetry analysis behind each CIF cost about 50 ms, and
        a committed structure never changes, so each is analysed once.
        """
        if candidate_id not in self._cif_cache:
            structure = structure_from_json(relaxed_json)
            self._cif_cache[candidate_id] = (
                structure.composition.reduced_formula,
                str(CifWriter(structure, symprec=0.1)),
            )
        return self._cif_cache[candidate_id]


def _pareto_ids(archive: Archive, objectives: Sequence[Any]) -> set[int]:
    points = {}
    for record in archive.unique_minima():
        values = record.extra.get("objectives", {})
        if all(o.name in values for o in objectives):
            points[record.id] = objective_scores(record.enthalpy_per_atom, values, objectives)
    return pareto_front(points)


def _csv_row(record: CandidateRecord, on_front: int | str = "") -> list:
    values = []
    for column in RESULT_COLUMNS:
        if column == "pareto_front":
            values.append(on_front)
            continue
        if column == "objectives":
            objective_values = record.extra.get("objectives")
            values.append(json.dumps(objective_values) if objective_values else "")
            continue
        value = getattr(record, column)
        if isinstance(value, float):
            value = f"{value:.6f}" if column.endswith("per_atom") else f"{value:.4g}"
        values.append("" if value is None else str(value))
    return values


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
