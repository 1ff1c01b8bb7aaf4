"""The durable archive of every candidate, and the search state that goes with it.

One SQLite file in WAL mode. Each change is one transaction that writes the candidate row *and* the
search algorithm's state together, so after a kill at any instant the state on disk always agrees
with the candidates on disk: there is no separate checkpoint file that can lag behind the archive.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from globopt.candidate import Evaluation, Proposal, RelaxTask, Status
from globopt.state_json import encode_state
from globopt.structure_codec import structure_from_json, structure_to_json

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    origin TEXT NOT NULL,
    parents TEXT NOT NULL DEFAULT '[]',
    formula TEXT NOT NULL,
    n_atoms INTEGER NOT NULL,
    initial TEXT NOT NULL,
    relaxed TEXT,
    energy REAL,
    energy_per_atom REAL,
    enthalpy_per_atom REAL,
    spacegroup TEXT,
    spacegroup_number INTEGER,
    volume_per_atom REAL,
    n_steps INTEGER,
    n_force_calls INTEGER,
    seconds REAL,
    potential_seconds REAL,
    reason TEXT NOT NULL DEFAULT '',
    duplicate_of INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    created_at REAL NOT NULL,
    finished_at REAL,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS candidates_status ON candidates(status);
CREATE TABLE IF NOT EXISTS search_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

USED_POTENTIAL = tuple(s.value for s in Status if s.used_potential)
# Seconds a write waits for another connection's write lock before it fails.
BUSY_TIMEOUT = 30.0
# Statuses of candidates that never reached a relaxation: the search may propose their structures again.
SCREENED_OUT = (Status.REJECTED, Status.DUPLICATE, Status.SKIPPED)


@dataclass(frozen=True)
class CandidateRecord:
    """One archived candidate, as the rest of the engine reads it (the columns of the candidates table).

    Structures stay JSON text until asked for (``initial``, ``relaxed``): most readers need a few numbers
    of many rows, and parsing every structure would dominate their cost.
    """

    id: int
    status: Status
    origin: str
    parents: str  # JSON list of candidate ids
    formula: str
    n_atoms: int
    initial_json: str
    relaxed_json: str | None
    energy: float | None
    energy_per_atom: float | None
    enthalpy_per_atom: float | None
    spacegroup: str | None
    spacegroup_number: int | None
    volume_per_atom: float | None
    n_steps: int | None
    n_force_calls: int | None
    seconds: float | None
    potential_seconds: float | None
    reason: str
    duplicate_of: int | None
    attempts: int
    worker: str | None
    created_at: float
    finished_at: float | None
    extra_json: str

    @property
    def initial(self) -> Structure:
        return structure_from_json(self.initial_json)

    @property
    def relaxed(self) -> Structure | None:
        return None if self.relaxed_json is None else structure_from_json(self.relaxed_json)

    @property
    def extra(self) -> dict[str, Any]:
        return json.loads(self.extra_json or "{}")

    @property
    def parent_ids(self) -> list[int]:
        return json.loads(self.parents or "[]")

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> CandidateRecord:
        values = dict(row)
        values["status"] = Status(values["status"])
        values["initial_json"] = values.pop("initial")
        values["relaxed_json"] = values.pop("relaxed")
        values["extra_json"] = values.pop("extra")
        return cls(**values)


class ArchiveError(RuntimeError):
    """The archive file is unreadable or from an incompatible version."""


def damaged_message(path: Path, detail: str, empty: bool = False) -> str:
    """What a user needs when the archive cannot be read: which file, what it means, how to recover."""
    salvage = (
        ""
        if empty
        else f"; or salvage the readable rows with `sqlite3 {path} .recover | sqlite3 recovered.sqlite`"
    )
    return (
        f"the run archive {path} is damaged or not a globopt archive ({detail}). It holds every candidate "
        f"and the search state, so the run cannot continue from it, and globopt will not start a new run "
        f"over it. To recover: restore {path.name} (with {path.name}-wal if present) from a backup{salvage}; "
        f"results.csv and best/ in {path.parent} still list what was committed before the damage. To search "
        f"again, start a new run with --out elsewhere."
    )


def write_failure_message(path: Path, detail: object) -> str:
    """Disk full, file-size limit or read-only directory: nothing committed is lost, say how to go on."""
    if "locked" in str(detail):  # SQLite's busy timeout ran out: another program holds a write lock
        return (
            f"cannot write to the run archive {path} ({detail}): another program has held a write lock on it "
            f"for {BUSY_TIMEOUT:.0f} s (e.g. an sqlite3 session with an open transaction, or a backup tool). "
            f"Every evaluation committed before this point is intact; close that program and continue with "
            f"`globopt resume {path.parent}`."
        )
    return (
        f"cannot write to the run archive {path} ({detail}): the disk may be full, a file-size limit "
        f"reached, or the run directory read-only. Every evaluation committed before this point is intact; "
        f"free space (or make {path.parent} writable) and continue with `globopt resume {path.parent}`."
    )


def _unreadable_message(path: Path, detail: object) -> str:
    """An archive that exists but cannot be opened for reading (permissions, a vanished mount)."""
    return (
        f"cannot read the run archive {path} ({detail}); check that the file and its folder are readable "
        f"(and, for a WAL database on a read-only folder, that {path.name}-shm is readable too)"
    )


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that can never write, and that creates nothing beside the archive.

    With a ``-wal`` file present (a run is writing, or was killed) the archive is read through SQLite's
    WAL index (``mode=ro``), which sees every commit and is safe beside a writer. Without one, every
    commit is in the main file and nobody has it open, so it is read as immutable: that works on
    read-only media and full disks, where the ``-shm`` index cannot be created, and leaves no file behind.
    """
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}"
    wal = path.with_name(path.name + "-wal")
    if not wal.exists():
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return db
    except sqlite3.OperationalError as exc:
        if "unable to open" not in str(exc):
            raise
        if wal.stat().st_size > 0:
            raise sqlite3.OperationalError(
                f"{wal.name} holds commits not yet in {path.name}, and SQLite cannot open its index "
                f"{path.name}-shm here (a read-only folder or a full disk); copy the run directory somewhere "
                f"writable and read the copy"
            ) from exc
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)


def _companions(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


class Archive:
    """One run's archive, opened for writing (the default) or only for reading (``read_only=True``).

    Opening never creates anything but a missing file: an existing file that is empty or unreadable is
    damage, never a new run, because the results.csv and best/ beside it may be the only other record.
    A run directory's archive is made by :meth:`create` instead, which is atomic, so a kill during the
    creation never leaves a half-made archive behind.
    """

    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        exists = path.exists()
        if exists and path.stat().st_size == 0:
            raise ArchiveError(damaged_message(path, "the file is empty (0 bytes)", empty=True))
        if read_only and not exists:
            raise ArchiveError(f"there is no run archive {path}")
        try:
            self.db = _connect_read_only(path) if read_only else sqlite3.connect(path, timeout=BUSY_TIMEOUT)
        except sqlite3.Error as exc:
            raise ArchiveError(_unreadable_message(path, exc)) from exc
        self.db.isolation_level = None
        self.db.row_factory = sqlite3.Row
        try:
            if exists:
                # A truncated or overwritten file can open fine and fail much later in the middle of a run;
                # quick_check reads every page once (well under a second for a large archive).
                problems = [r[0] for r in self.db.execute("PRAGMA quick_check(5)")]
                if problems != ["ok"]:
                    raise ArchiveError(damaged_message(path, "; ".join(problems)))
            if read_only:
                version = self.get_meta("schema_version")
            else:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self._synchronous = "FULL"
                self.db.executescript(_SCHEMA)
                version = self.get_meta("schema_version")
        except ArchiveError:
            self.db.close()
            raise
        except sqlite3.OperationalError as exc:
            self.db.close()
            if "malformed" in str(exc) or "not a database" in str(exc) or "no such table" in str(exc):
                raise ArchiveError(damaged_message(path, str(exc))) from exc
            if read_only:
                raise ArchiveError(_unreadable_message(path, exc)) from exc
            raise ArchiveError(write_failure_message(path, exc)) from exc
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise ArchiveError(damaged_message(path, str(exc))) from exc
        # finished_at orders commits (relaxed_in_commit_order); a clock set back must not reorder them
        self._last_stamp = 0.0
        if not read_only:
            row = self.db.execute("SELECT MAX(finished_at) FROM candidates").fetchone()
            self._last_stamp = float(row[0] or 0.0)
        if version is None:
            if read_only:
                self.db.close()
                raise ArchiveError(damaged_message(path, "it holds no globopt schema version"))
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            self.db.close()
            raise ArchiveError(f"{path} has archive schema {version}, this globopt reads {SCHEMA_VERSION}")

    @classmethod
    def create(cls, path: Path, meta: dict[str, str]) -> None:
        """Make a new archive at ``path`` holding ``meta`` (e.g. the run's config), atomically.

        The archive is built under a temporary name, closed (which folds its WAL into the file), synced,
        and only then renamed into place: ``path`` either does not exist or is a complete archive.
        """
        staging = path.with_name(path.name + ".new")
        for leftover in _companions(staging):
            leftover.unlink(missing_ok=True)
        try:
            archive = cls(staging)
            try:
                with archive._transaction():
                    for key, value in meta.items():
                        archive.db.execute(
                            "INSERT INTO meta(key, value) VALUES(?, ?)"
                            " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                            (key, value),
                        )
            finally:
                archive.close()
            with open(staging, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(staging, path)
            _fsync_directory(path.parent)
        except (ArchiveError, OSError) as exc:
            cause = exc.__cause__ if isinstance(exc, ArchiveError) and exc.__cause__ is not None else exc
            raise ArchiveError(write_failure_message(path, cause)) from exc
        finally:
            for leftover in _companions(staging):
                leftover.unlink(missing_ok=True)

    def _stamp(self) -> float:
        """The wall-clock time of a commit, never earlier than the previous one.

        Commit order is read back from these stamps, so a system clock stepped back (NTP, a VM restored
        from a snapshot, a node with a wrong clock resuming the run) must not reorder it: the stamp then
        advances by a microsecond from the last one until the clock catches up.
        """
        self._last_stamp = max(time.time(), self._last_stamp + 1e-6)
        return self._last_stamp

    def close(self) -> None:
        # screened rows written without a commit of their own are committed now
        if not self.read_only and self.db.in_transaction:
            with self._transaction():
                pass
        self.db.close()

    # -- transactions ------------------------------------------------------------------------------
    def _transaction(self, commit: bool = True, wait_for_disk: bool = True):
        """``wait_for_disk=False`` commits without an fsync (see add_candidate for when that is safe)."""
        if not self.db.in_transaction:
            level = "FULL" if wait_for_disk else "NORMAL"
            if level != self._synchronous:
                self.db.execute(f"PRAGMA synchronous={level}")
                self._synchronous = level
        return _Transaction(self.db, self.path, commit)

    def _write_state(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.db.execute(
                "INSERT INTO search_state(key, value) VALUES('state', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (encode_state(state),),
            )

    def add_candidate(
        self,
        proposal: Proposal,
        status: Status,
        state: dict[str, Any] | Callable[[int], dict[str, Any]] | None,
        reason: str = "",
        duplicate_of: int | None = None,
    ) -> int:
        """Insert a new candidate (pending, or rejected before relaxation) together with the search state.

        ``state`` may be a function of the new id: the search learns the id and its state is written in the
        same transaction, so the archive never holds a candidate the stored search state does not know.

        A candidate screened out before relaxation (rejected, duplicate) is not committed on its own: it
        joins the next transaction that is (the next pending candidate or result). A pending candidate is
        committed without waiting for the disk (SQLite synchronous=NORMAL in WAL mode): that survives any
        kill of the process, and a power loss can only roll the archive back to the last result, whose
        commit fsyncs everything before it. Either way what is lost is proposals, together with the search
        state after them, and never a relaxation: resume proposes the same structures again and screens them
        the same way. That leaves one fsync per evaluation instead of one per proposal.
        """
        s = proposal.structure
        now = time.time() if status is Status.PENDING else self._stamp()
        with self._transaction(commit=status is Status.PENDING, wait_for_disk=False):
            cursor = self.db.execute(
                "INSERT INTO candidates(status, origin, parents, formula, n_atoms, initial, volume_per_atom,"
                " reason, duplicate_of, created_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    status.value,
                    proposal.origin,
                    json.dumps(list(proposal.parents)),
                    s.composition.formula.replace(" ", ""),
                    len(s),
                    proposal.screening.structure_json
                    if proposal.screening is not None and proposal.screening.structure_json
                    else structure_to_json(s),
                    s.volume / len(s),
                    reason,
                    duplicate_of,
                    now,
                    None if status is Status.PENDING else now,
                ),
            )
            candidate_id = int(cursor.lastrowid)
            self._write_state(state(candidate_id) if callable(state) else state)
        return candidate_id

    def record_attempt(self, candidate_id: int, attempt: int) -> None:
        with self._transaction():
            self.db.execute("UPDATE candidates SET attempts=? WHERE id=?", (attempt, candidate_id))

    def commit_evaluation(
        self,
        evaluation: Evaluation,
        state: dict[str, Any] | None,
        duplicate_of: int | None = None,
        supersedes: int | None = None,
    ) -> None:
        """Record a finished relaxation; after this returns the result survives any kill (and power loss).

        ``supersedes``: an earlier representative of the same minimum that this lower-energy result
        replaces; it and its duplicates are pointed at the new one in the same transaction.
        """
        e = evaluation
        relaxed = e.relaxed
        # a surrogate's `skipped` verdict cost no relaxation: like a proposal, it need not wait for the disk
        with self._transaction(wait_for_disk=e.status.used_potential):
            self.db.execute(
                "UPDATE candidates SET status=?, reason=?, relaxed=?, energy=?, energy_per_atom=?,"
                " enthalpy_per_atom=?, spacegroup=?, spacegroup_number=?,"
                " volume_per_atom=COALESCE(?, volume_per_atom),"
                " n_steps=?, n_force_calls=?, seconds=?, potential_seconds=?, duplicate_of=?, worker=?,"
                " finished_at=?, extra=? WHERE id=?",
                (
                    e.status.value,
                    e.reason,
                    (e.relaxed_json or structure_to_json(relaxed)) if relaxed is not None else None,
                    e.energy,
                    e.energy_per_atom,
                    e.enthalpy_per_atom,
                    e.spacegroup,
                    e.spacegroup_number,
                    relaxed.volume / len(relaxed) if relaxed is not None else None,
                    e.n_steps,
                    e.n_force_calls,
                    e.seconds,
                    e.potential_seconds,
                    duplicate_of,
                    e.worker,
                    self._stamp(),
                    json.dumps(e.extra),
                    e.candidate_id,
                ),
            )
            if supersedes is not None:
                self.db.execute(
                    "UPDATE candidates SET duplicate_of=? WHERE id=? OR duplicate_of=?",
                    (e.candidate_id, supersedes, supersedes),
                )
            self._write_state(state)

    # -- queries -----------------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any] | None:
        row = self.db.execute("SELECT value FROM search_state WHERE key='state'").fetchone()
        if row is None:
            return None
        try:
            state = json.loads(row["value"])
        except ValueError as exc:
            raise ArchiveError(
                damaged_message(self.path, f"its stored search state is not valid JSON: {exc}")
            ) from None
        if not isinstance(state, dict):
            raise ArchiveError(damaged_message(self.path, "its stored search state is not a mapping"))
        return state

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row["value"] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction():
            self.db.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

    def pending_tasks(self) -> list[RelaxTask]:
        rows = self.db.execute(
            "SELECT id, initial, attempts FROM candidates WHERE status='pending' ORDER BY id"
        )
        return [RelaxTask(r["id"], structure_from_json(r["initial"]), r["attempts"]) for r in rows]

    def count_used_potential(self) -> int:
        marks = ",".join("?" * len(USED_POTENTIAL))
        return int(
            self.db.execute(
                f"SELECT COUNT(*) FROM candidates WHERE status IN ({marks})", USED_POTENTIAL
            ).fetchone()[0]
        )

    def count_force_calls(self) -> int:
        """Potential calls of every committed evaluation (budget.force_calls counts across restarts)."""
        return int(
            self.db.execute(
                "SELECT COALESCE(SUM(n_force_calls), 0) FROM candidates WHERE status != 'pending'"
            ).fetchone()[0]
        )

    def finished_ids(self) -> set[int]:
        """Ids of every candidate with an outcome (what results.csv lists)."""
        return {r[0] for r in self.db.execute("SELECT id FROM candidates WHERE status != 'pending'")}

    def count_by_status(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) AS n FROM candidates GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    def _select(self, where: str = "", params: tuple = (), order: str = "id") -> Iterator[CandidateRecord]:
        for row in self.db.execute(f"SELECT * FROM candidates {where} ORDER BY {order}", params):
            yield CandidateRecord.from_row(row)

    def records(
        self,
        statuses: Iterable[Status] | None = None,
        exclude: Iterable[Status] = (),
    ) -> Iterator[CandidateRecord]:
        """Candidates in id order (the order they were proposed), optionally only or all but some statuses."""
        clauses, params = [], []
        if statuses is not None:
            wanted = [Status(s).value for s in statuses]
            clauses.append(f"status IN ({','.join('?' * len(wanted))})")
            params += wanted
        excluded = [Status(s).value for s in exclude]
        if excluded:
            clauses.append(f"status NOT IN ({','.join('?' * len(excluded))})")
            params += excluded
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        yield from self._select(where, tuple(params))

    def finished(self) -> Iterator[CandidateRecord]:
        """Every candidate with an outcome (everything but pending), in id order."""
        yield from self.records(exclude=(Status.PENDING,))

    def used_potential(self) -> Iterator[CandidateRecord]:
        """Candidates that cost a relaxation (they count against the budget), in id order."""
        yield from self.records(statuses=[Status(s) for s in USED_POTENTIAL])

    def unique_minima(self) -> Iterator[CandidateRecord]:
        """Relaxed candidates that are the first (or lowest) of their minimum, in id order."""
        yield from self._select("WHERE status='relaxed' AND duplicate_of IS NULL")

    def relaxed_in_commit_order(self) -> Iterator[CandidateRecord]:
        """Relaxed candidates in the order their results were committed (finished_at is stamped then).

        This is the order the running engine learned them in, so a model rebuilt from it on resume is the
        model the killed run had.
        """
        yield from self._select("WHERE status='relaxed'", order="finished_at, id")

    def record(self, candidate_id: int) -> CandidateRecord | None:
        row = self.db.execute("SELECT * FROM candidates WHERE id=?", (candidate_id,)).fetchone()
        return None if row is None else CandidateRecord.from_row(row)

    def best_unique(self, limit: int) -> list[CandidateRecord]:
        """Lowest-enthalpy relaxed candidates that are not duplicates of an earlier one, best first."""
        rows = self.db.execute(
            "SELECT * FROM candidates WHERE status='relaxed' AND duplicate_of IS NULL"
            " ORDER BY enthalpy_per_atom, id LIMIT ?",
            (limit,),
        )
        return [CandidateRecord.from_row(row) for row in rows]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error, so a half-written change never lands.

    A failed write (disk full, file-size limit, read-only file) becomes an ArchiveError that says so: SQLite
    itself only reports "disk I/O error" or "database or disk is full".
    """

    def __init__(self, db: sqlite3.Connection, path: Path, commit: bool = True) -> None:
        self.db = db
        self.path = path
        self.commit = commit  # False: leave the transaction open for the next one to commit

    def __enter__(self) -> None:
        if self.db.in_transaction:  # continuing uncommitted work (see Archive.add_candidate)
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise ArchiveError(write_failure_message(self.path, exc)) from exc

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self.commit:
                return
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.OperationalError as error:
                self._rollback()
                raise ArchiveError(write_failure_message(self.path, error)) from error
        self._rollback()
        if isinstance(exc, sqlite3.OperationalError):
            raise ArchiveError(write_failure_message(self.path, exc)) from exc

    def _rollback(self) -> None:
        # SQLite may already have rolled back a transaction that failed on I/O
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("ROLLBACK")
