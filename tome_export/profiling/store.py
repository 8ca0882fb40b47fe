"""Profile results in a local SQLite database, safe for concurrent writers.

One row per measured configuration (device, model, method, schedule, target, tool
version, batch size), with the full record as JSON. WAL journaling lets readers and a
writer work at once; a busy timeout plus a retry loop around ``BEGIN IMMEDIATE`` makes two
profile runs writing at the same moment both land their rows.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from tome_export.errors import UserError

RESULTS_SCHEMA = "tome-export-results"
RESULTS_SCHEMA_VERSION = 1
KEY_FIELDS = ("device", "model", "method", "schedule", "target", "tool_version", "batch_size")
REQUIRED_FIELDS = (*KEY_FIELDS, "id", "created", "latency_ms")
BUSY_TIMEOUT_S = 30.0
RETRIES = 20

_DDL = """
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    schedule TEXT NOT NULL,
    r INTEGER,
    target TEXT NOT NULL,
    tool_version TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    latency_median_ms REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_key ON results (device, model, method, schedule, target, tool_version, batch_size);
"""


def default_db_path() -> Path:
    """``$XDG_CACHE_HOME/tome-export/results.sqlite`` (``~/.cache`` when unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tome-export" / "results.sqlite"


def _retry(action):
    """Run ``action`` again when another writer holds the lock past the busy timeout."""
    for attempt in range(RETRIES):
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or attempt == RETRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1) + random.random() * 0.05)


class ResultStore:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_db_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self.connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            _retry(lambda: self.connection.execute("PRAGMA journal_mode = WAL"))
            _retry(lambda: self.connection.executescript(_DDL))
            # Prove we can write now, before minutes of measuring are lost to a read-only file.
            _retry(lambda: self.connection.execute("BEGIN IMMEDIATE"))
            self.connection.execute("COMMIT")
        except (OSError, sqlite3.Error) as exc:
            raise UserError(
                f"cannot write the results database {self.path}: {exc}; pass --db with a writable path"
            ) from None

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, records: Iterable[dict]) -> int:
        """Insert records in one transaction; records whose id is already stored are skipped."""
        rows = [
            (
                rec["id"],
                rec["created"],
                rec["device"],
                rec["model"],
                rec["method"],
                rec["schedule"],
                rec.get("r"),
                rec["target"],
                rec["tool_version"],
                int(rec["batch_size"]),
                float(rec["latency_ms"]["median"]),
                json.dumps(rec, sort_keys=True),
            )
            for rec in records
        ]

        def write() -> int:
            cursor = self.connection.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                before = self.connection.total_changes
                cursor.executemany("INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
                added = self.connection.total_changes - before
                cursor.execute("COMMIT")
                return added
            except BaseException:
                cursor.execute("ROLLBACK")
                raise

        return _retry(write)

    def records(self, **where) -> list[dict]:
        clauses = [f"{k} = ?" for k in where]
        sql = (
            "SELECT record FROM results"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + " ORDER BY created, rowid"
        )
        rows = _retry(lambda: self.connection.execute(sql, tuple(where.values())).fetchall())
        return [json.loads(row[0]) for row in rows]


def results_document(records: list[dict]) -> dict:
    """The JSON file format shared by ``report --json`` and ``import-results``."""
    return {"schema": RESULTS_SCHEMA, "schema_version": RESULTS_SCHEMA_VERSION, "results": records}


def read_results_file(path: str | Path) -> list[dict]:
    """Validate a results JSON file (e.g. measured on a Jetson or a phone) and return its records."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("schema") != RESULTS_SCHEMA:
        raise UserError(f'{path} is not a tome-export results file (need "schema": "{RESULTS_SCHEMA}")')
    if document.get("schema_version", 0) > RESULTS_SCHEMA_VERSION:
        raise UserError(f"{path} has results schema version {document['schema_version']}; upgrade tome-export")
    records = document.get("results")
    if not isinstance(records, list):
        raise UserError(f'{path}: "results" must be a list of records')
    for index, rec in enumerate(records):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(rec, dict) or f not in rec]
        if missing:
            raise UserError(f"{path}: result #{index} lacks {', '.join(missing)}")
        if not isinstance(rec["latency_ms"], dict) or "median" not in rec["latency_ms"]:
            raise UserError(f"{path}: result #{index} needs latency_ms.median (milliseconds)")
        rec.setdefault("source", "imported")
    return records
