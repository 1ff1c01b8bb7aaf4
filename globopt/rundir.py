"""The run directory: config copy, archive, lock, results table and best structures.

Layout of ``runs/<name>/``::

    config.yaml      the validated config the run uses, for people to read (the archive keeps the copy
                     a resume checks against)
    archive.sqlite   every candidate, the search state and the run's config (the only source of truth)
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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pymatgen.io.cif import CifWriter

from globopt.archive import Archive, ArchiveError, CandidateRecord
from globopt.config import ConfigError, RunConfig, load_config
from globopt.config_copy import (
    CONFIG_META,
    RESUMABLE_CHANGES,
    changed_sections,
    comparable,
    forbidden_changes,
    stored_config,
)
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

# What a run that never got going may leave behind (a lock file, a log that says why): never a reason to
# refuse a directory.
HARMLESS = frozenset(
    {"run.lock", "globopt.log"}
    # an archive whose creation was interrupted (Archive.create renames it into place only when complete)
    | {f"archive.sqlite.new{suffix}" for suffix in ("", "-wal", "-shm", "-journal")}
)
# Everything a run writes into its directory: what a retry may clear when nothing was committed.
RUN_FILES = (
    "config.yaml",
    "config.yaml.tmp",
    "results.csv",
    "results.csv.tmp",
    "ranked.csv",
    "ranked.csv.tmp",
    "hull.csv",
    "hull.csv.tmp",
    "hull.png",
)
RUN_FOLDERS = ("best", "best.tmp", "best.old", "stable", "stable.tmp", "stable.old", "hull")


# RunDirectory.writer() when the lock cannot be tested
UNKNOWN_WRITER = "cannot tell whether a process writes the run"


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
        # set by create(): this session made the run, so it may clear it if it fails before any commit
        self.created_here = False
        # what opening the run found worth telling (logged once the run's log is set up)
        self.notes: list[str] = []

    # -- lifecycle -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config: RunConfig) -> RunDirectory:
        """A new run in ``path``: a new or empty folder, or one whose earlier run never committed anything.

        Anything else is refused: a folder holding other files (globopt would overwrite its config.yaml,
        results.csv and best/), a run with results, or damaged remains of one.
        """
        run = cls(path)
        run._check_free_for_a_new_run()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(
                f"cannot create the run directory {path} ({exc}); choose another with --out"
            ) from exc
        run.acquire_lock()
        try:
            if run.archive_path.exists():  # a run that committed nothing: checked again under the lock
                run._check_free_for_a_new_run()
                run.notes.append(f"{path} held a run that never committed an evaluation; starting over there")
                run._remove_run_files()
            # the archive first: it holds the config, so a kill between the two leaves a resumable run
            Archive.create(run.archive_path, {CONFIG_META: config.to_yaml()})
            atomic_write(run.config_path, config.to_yaml())
        except ArchiveError as exc:
            run.release_lock()
            raise RunDirError(str(exc)) from None
        except OSError as exc:
            run.release_lock()
            raise RunDirError(
                f"cannot write to the run directory {path} ({exc}); a run needs it writable "
                f"(check permissions and free space), or choose another directory with --out"
            ) from exc
        run.created_here = True
        return run

    def _check_free_for_a_new_run(self) -> None:
        path = self.path
        if not path.exists():
            return
        if not path.is_dir():
            raise RunDirError(f"{path} exists and is not a directory; choose another directory with --out")
        if self.archive_path.exists():
            try:
                archive = Archive(self.archive_path, read_only=True)
            except ArchiveError as exc:
                raise RunDirError(f"{path} holds a run archive that cannot be used: {exc}") from None
            try:
                used = archive.count_used_potential()
                lost = self.lost_commits(archive)
            finally:
                archive.close()
            if lost:
                raise RunDirError(self.lost_commits_message(lost))
            if used:
                raise RunDirError(
                    f"{path} already holds a run ({used} evaluations committed); continue it with "
                    f"`globopt resume {path}` (or `globopt run CONFIG --resume --out {path}`), or choose "
                    f"another directory with --out"
                )
            return
        contents = sorted(p.name for p in path.iterdir() if p.name not in HARMLESS)
        if not contents:
            return
        if {"results.csv", "best"} & set(contents):
            raise RunDirError(
                f"{path} holds the results of a run ({', '.join(_listing(contents))}) but no archive.sqlite: "
                f"the archive was deleted or moved, and it is the run's only complete record. To continue "
                f"that run, put archive.sqlite back and use `globopt resume {path}`; globopt will not "
                f"overwrite results.csv and best/. For a new run choose another directory with --out"
            )
        if contents == ["config.yaml"]:
            raise RunDirError(
                f"{path} holds a config.yaml and nothing else: a run writes its own config.yaml there and "
                f"would overwrite yours. Keep your config outside the run directory (e.g. {path}.yaml), or "
                f"choose another directory with --out"
            )
        raise RunDirError(
            f"{path} is not empty ({', '.join(_listing(contents))}) and is not a globopt run: a run writes "
            f"config.yaml, results.csv and best/ there and would overwrite files of those names. Choose an "
            f"empty or new directory with --out"
        )

    def lost_commits(self, archive: Archive) -> list[int]:
        """Ids results.csv lists as finished that the archive does not hold: commits the archive lost.

        The usual cause is an ``archive.sqlite-wal`` deleted (or not copied) after a kill: SQLite keeps
        recent commits there until it folds them into the main file. results.csv is then the only record of
        those evaluations, and a resume or a new run would rewrite it.
        """
        try:
            with open(self.results_path, newline="") as handle:
                listed = {int(row["id"]) for row in csv.DictReader(handle) if (row.get("id") or "").isdigit()}
        except (OSError, KeyError, ValueError, csv.Error):
            return []
        return sorted(listed - archive.finished_ids())

    def lost_commits_message(self, lost: list[int]) -> str:
        ids = ", ".join(map(str, lost[:10])) + (f" and {len(lost) - 10} more" if len(lost) > 10 else "")
        return (
            f"{self.results_path} lists {len(lost)} finished candidate(s) that {self.archive_path} does "
            f"not hold (ids {ids}): the archive lost commits, most likely because archive.sqlite-wal was "
            f"deleted or not copied after the run was killed. Restore archive.sqlite-wal if you still have "
            f"it. To go on without those evaluations, move results.csv aside (it is their only record): "
            f"globopt then rewrites it from the archive"
        )

    def _remove_run_files(self) -> None:
        """Remove what a run wrote (but the log and the lock): only ever for a run with nothing committed."""
        for companion in ("", "-wal", "-shm", "-journal"):
            (self.path / f"archive.sqlite{companion}").unlink(missing_ok=True)
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(self.path / name, ignore_errors=True)

    def discard_if_nothing_committed(self) -> bool:
        """After this session's new run failed before committing an evaluation: clear what it wrote.

        Nothing of value is lost (no relaxation finished), and the corrected command can then be run on
        the same directory. The log stays, with the reason. Returns whether the run was cleared.
        """
        if not self.created_here or not self.archive_path.exists():
            return False
        try:
            archive = Archive(self.archive_path, read_only=True)
            try:
                used = archive.count_used_potential()
            finally:
                archive.close()
        except ArchiveError:
            return False
        if used:
            return False
        self._remove_run_files()
        self.release_lock()
        self.lock_path.unlink(missing_ok=True)
        return True

    @classmethod
    def open_existing(cls, path: Path, new_config: RunConfig | None = None) -> tuple[RunDirectory, RunConfig]:
        """Open a run for resuming; a new config may change only budget, workers and output.

        The archive's own copy of the config is the reference: config.yaml (which a person may have
        edited) and ``new_config`` are compared against it. Archives written before the copy existed fall
        back to config.yaml, and get the copy from now on.
        """
        run = cls(path)
        run._check_resumable()
        run.acquire_lock()
        try:
            config = run._config_for_resume(new_config)
        except BaseException:
            run.release_lock()
            raise
        return run, config

    def _check_resumable(self) -> None:
        path = self.path
        if not path.is_dir():
            raise RunDirError(f"there is no run directory {path}")
        if self.archive_path.exists():
            return
        left = sorted(p.name for p in path.iterdir() if p.name not in HARMLESS)
        if left:
            raise RunDirError(
                f"{path} has no archive.sqlite, the record a resume continues from (it holds "
                f"{', '.join(_listing(left))}). If it was deleted or moved, restore it (with "
                f"archive.sqlite-wal if there is one) and resume again; results.csv and best/ are left "
                f"untouched. Otherwise this is not a globopt run directory"
            )
        raise RunDirError(f"{path} is not a globopt run directory (no archive.sqlite)")

    def _config_for_resume(self, new_config: RunConfig | None) -> RunConfig:
        try:
            archive = Archive(self.archive_path)
        except ArchiveError as exc:
            raise RunDirError(str(exc)) from None
        try:
            stored_text = archive.get_meta(CONFIG_META)
            committed = archive.count_used_potential()
            if stored_text is None:
                stored_text, base = self._config_from_older_archive()
            elif new_config is None:
                base = self._directory_config(stored_text, committed)
            lost = self.lost_commits(archive)
            if lost:
                raise RunDirError(self.lost_commits_message(lost))
            if new_config is not None:  # it replaces config.yaml, so only the archive's copy matters
                self._refuse_changes(stored_text, new_config, committed)
                config = new_config
            else:
                config = base
            text = config.to_yaml()
            if text != stored_text:
                archive.set_meta(CONFIG_META, text)
        except ArchiveError as exc:
            raise RunDirError(str(exc)) from None
        finally:
            archive.close()
        if not self.config_path.is_file() or self.config_path.read_text() != text:
            try:
                atomic_write(self.config_path, text)
            except OSError as exc:
                raise RunDirError(
                    f"cannot write to the run directory {self.path} ({exc}); a run needs it writable "
                    f"(check permissions and free space), or choose another directory with --out"
                ) from exc
        return config

    def _config_from_older_archive(self) -> tuple[str, RunConfig]:
        """An archive from before it kept its config: config.yaml is all there is (and is trusted)."""
        if not self.config_path.is_file():
            raise RunDirError(
                f"{self.archive_path} keeps no copy of its config (it was made by an older globopt) and "
                f"{self.config_path} is missing: restore config.yaml from where the run was started"
            )
        config = self._load_directory_config()
        self.notes.append(
            f"{self.archive_path} keeps no copy of its config (made by an older globopt): using "
            f"{self.config_path} as the run's config, and keeping a copy in the archive from now on"
        )
        return config.to_yaml(), config

    def _directory_config(self, stored_text: str, committed: int) -> RunConfig:
        """config.yaml checked against the archive's copy, or that copy when config.yaml is gone."""
        if not self.config_path.is_file():
            self.notes.append(f"{self.config_path} is missing: restored from the copy in {self.archive_path}")
            try:
                return stored_config(stored_text, f"the config stored in {self.archive_path}")
            except ConfigError as exc:
                raise RunDirError(str(exc)) from None
        config = self._load_directory_config()
        changes = forbidden_changes(comparable(stored_text), config)
        if changes and committed:
            raise RunDirError(
                f"{self.config_path} does not match the config this run was made with, which "
                f"archive.sqlite keeps (config.yaml was edited, or the archive belongs to another run): "
                f"{'; '.join(changes)}. A resume may change only "
                f"{', '.join(sorted(RESUMABLE_CHANGES))}. Undo the edit (or delete config.yaml: the resume "
                f"restores it from the archive); to search with the new settings start a new run with --out"
            )
        return config

    def _load_directory_config(self) -> RunConfig:
        try:
            return load_config(self.config_path)
        except ConfigError as exc:
            raise RunDirError(
                f"the run's config {self.config_path} is no longer valid:\n{exc}\n(the archive keeps its "
                f"own copy: delete {self.config_path.name} to have the resume restore it, or fix the file)"
            ) from None

    def _refuse_changes(self, stored_text: str, new: RunConfig, committed: int) -> None:
        changes = forbidden_changes(comparable(stored_text), new)
        if not changes:
            return
        if not committed:
            self.notes.append(
                f"nothing was committed yet: the run continues with the new config ({'; '.join(changes)})"
            )
            return
        raise RunDirError(
            f"cannot resume {self.path} with a config that changes {', '.join(changed_sections(changes))} "
            f"({'; '.join(changes)}): only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume;"
            " start a new run with --out"
        )

    def read_config(self, archive: Archive) -> tuple[RunConfig, str]:
        """The run's config for reading it (status, report), and a note on where it came from ('' if the
        archive's copy). Skips the checks that look outside the config: the model need not be here."""
        text = archive.get_meta(CONFIG_META)
        if text is not None:
            try:
                return stored_config(text, f"the config stored in {self.archive_path}", False), ""
            except ConfigError as exc:
                raise RunDirError(str(exc)) from None
        if not self.config_path.is_file():
            raise RunDirError(
                f"{self.archive_path} keeps no copy of its config (made by an older globopt) and "
                f"{self.config_path} is missing: restore config.yaml from where the run was started"
            )
        try:
            config = load_config(self.config_path, check_environment=False)
        except ConfigError as exc:
            raise RunDirError(f"the run's config {self.config_path} is not valid:\n{exc}") from None
        return config, f"config from {self.config_path.name} (this archive predates its own copy)"

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
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: an NFS mount without its lock service, some FUSE mounts
            handle.close()
            raise RunDirError(
                f"cannot lock {self.lock_path} ({exc}): this file system does not support file locks (an "
                f"NFS mount without its lock service?), so globopt cannot make sure that only one process "
                f"writes the run. Put the run directory on a file system with locks (a local disk, or NFS "
                f"with lockd)"
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

    def writer(self) -> str | None:
        """Who holds the run's lock ('pid N on HOST'), or None when no process is writing the run.

        Tests the lock without keeping it (a shared lock, released at once), so it never stands in a
        writer's way for more than that instant and works on a read-only directory.
        """
        try:
            handle = open(self.lock_path)  # noqa: SIM115 - closed below
        except OSError:
            return None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "another process"
            except OSError as exc:  # a file system without locks: cannot tell
                return f"{UNKNOWN_WRITER} ({self.lock_path} cannot be locked here: {exc})"
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None
        finally:
            handle.close()

    def open_archive(self, read_only: bool = False) -> Archive:
        return Archive(self.archive_path, read_only=read_only)

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
        replace_folder(staging, self.best_path)
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


def _listing(names: list[str], limit: int = 6) -> list[str]:
    return names[:limit] + ([f"and {len(names) - limit} more"] if len(names) > limit else [])


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def replace_cif_folder(folder: Path, archive: Archive, named: Iterable[tuple[str, int]]) -> list[Path]:
    """Replace ``folder`` (a screen's or a chemical system's stable/) with CIFs of relaxed candidates.

    ``named``: (file name, candidate id) pairs. A file of that name already in the folder is reused as is:
    a committed relaxed structure never changes, and symmetrising a CIF costs a spglib call each.
    """
    from pymatgen.io.cif import CifWriter

    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = []
    for name, candidate_id in named:
        if (folder / name).is_file():
            shutil.copy2(folder / name, staging / name)
        else:
            CifWriter(archive.record(candidate_id).relaxed, symprec=0.1).write_file(staging / name)
        written.append(folder / name)
    replace_folder(staging, folder)
    return written


def replace_folder(staging: Path, folder: Path) -> None:
    """Put a fully written ``staging`` folder in place of ``folder`` (best/, stable/): the old one is moved
    aside to ``<name>.old`` first, so a kill at any point leaves one complete folder, never half of one."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)
