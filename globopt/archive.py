"""The durable archive of every candidate, and the search state that goes with it.

One SQLite file in WAL mode. Each change is one transaction that writes the candidate row *and* the
search algorithm's state together, so after a kill at any instant the state on disk always agrees
with the candidates on disk: there is no separate checkpoint file that can lag behind the archive.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from globopt.candidate import Evaluation, Proposal, RelaxTask, Status

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


class ArchiveError(RuntimeError):
    """The archive file is unreadable or from an incompatible version."""


def structure_to_json(structure: Structure) -> str:
    return json.dumps(structure.as_dict(), separators=(",", ":"))


def structure_from_json(text: str) -> Structure:
    return Structure.from_dict(json.loads(text))


class Archive:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
        except sqlite3.DatabaseError as exc:
            raise ArchiveError(
                f"{path} is not a readable globopt archive ({exc}). If a copy exists, restore it; "
                f"otherwise start a new run with --out pointing elsewhere."
            ) from exc
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise ArchiveError(f"{path} has archive schema {version}, this globopt reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    # -- transactions ------------------------------------------------------------------------------
    def _transaction(self):
        return _Transaction(self.db)

    def _write_state(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.db.execute(
                "INSERT INTO search_state(key, value) VALUES('state', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (json.dumps(state, separators=(",", ":")),),
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
        """
        s = proposal.structure
        now = time.time()
        with self._transaction():
            cursor = self.db.execute(
                "INSERT INTO candidates(status, origin, parents, formula, n_atoms, initial, volume_per_atom,"
                " reason, duplicate_of, created_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    status.value,
                    proposal.origin,
                    json.dumps(list(proposal.parents)),
                    s.composition.formula.replace(" ", ""),
                    len(s),
                    structure_to_json(s),
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
        """Record a finished relaxation; after this returns the result survives any kill.

        ``supersedes``: an earlier representative of the same minimum that this lower-energy result
        replaces; it and its duplicates are pointed at the new one in the same transaction.
        """
        e = evaluation
        relaxed = e.relaxed
        with self._transaction():
            self.db.execute(
                "UPDATE candidates SET status=?, reason=?, relaxed=?, energy=?, energy_per_atom=?,"
                " enthalpy_per_atom=?, spacegroup=?, spacegroup_number=?,"
                " volume_per_atom=COALESCE(?, volume_per_atom),"
                " n_steps=?, n_force_calls=?, seconds=?, potential_seconds=?, duplicate_of=?, worker=?,"
                " finished_at=?, extra=? WHERE id=?",
                (
                    e.status.value,
                    e.reason,
                    structure_to_json(relaxed) if relaxed is not None else None,
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
                    time.time(),
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
        return json.loads(row["value"]) if row else None

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

    def count_by_status(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) AS n FROM candidates GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    def rows(self, where: str = "", params: tuple = ()) -> Iterator[sqlite3.Row]:
        yield from self.db.execute(f"SELECT * FROM candidates {where} ORDER BY id", params)

    def row(self, candidate_id: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM candidates WHERE id=?", (candidate_id,)).fetchone()

    def best_unique(self, limit: int) -> list[sqlite3.Row]:
        """Lowest-enthalpy relaxed candidates that are not duplicates of an earlier one, best first."""
        return list(
            self.db.execute(
                "SELECT * FROM candidates WHERE status='relaxed' AND duplicate_of IS NULL"
                " ORDER BY enthalpy_per_atom, id LIMIT ?",
                (limit,),
            )
        )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error, so a half-written change never lands."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
