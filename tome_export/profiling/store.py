"""Profile results in a local SQLite database, safe for concurrent writers.

One row per measured configuration (device, model, method, schedule, target, tool
version, batch size), with the full record as JSON. WAL journaling lets readers and a
writer work at once; a busy timeout plus a retry loop around ``BEGIN IMMEDIATE`` makes two
profile runs writing at the same moment both land their rows.
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from tome_export.errors import UserError, first_line

RESULTS_SCHEMA = "tome-export-results"
RESULTS_SCHEMA_VERSION = 1
KEY_FIELDS = ("device", "model", "method", "schedule", "target", "tool_version", "batch_size")
REQUIRED_FIELDS = (*KEY_FIELDS, "id", "created", "latency_ms")
MAX_DEPTH = 32  # nesting a record may have (report and json.dumps must be able to walk it)
MAX_TEXT = 500
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


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _depth(value: object, limit: int) -> int:
    """Nesting depth of a JSON value, stopping past ``limit``."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in children), default=0)


def _check_numbers(table: object, where: str, optional: tuple[str, ...]) -> None:
    if not isinstance(table, dict):
        raise ValueError(f"{where} is not an object")
    for key in optional:
        if table.get(key) is not None and not _number(table[key]):
            raise ValueError(f"{where}.{key} is not a finite number")


def validate_record(rec: object) -> None:
    """Raise ValueError (one line) unless ``rec`` is a result record every reader can use."""
    if not isinstance(rec, dict):
        raise ValueError("is not an object")
    missing = [f for f in REQUIRED_FIELDS if f not in rec]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    for key in (*KEY_FIELDS[:-1], "id", "created"):
        if not isinstance(rec[key], str) or not rec[key] or len(rec[key]) > MAX_TEXT:
            raise ValueError(f"{key} is not a non-empty string")
    if not isinstance(rec["batch_size"], int) or isinstance(rec["batch_size"], bool) or rec["batch_size"] < 1:
        raise ValueError("batch_size is not a positive integer")
    if rec.get("r") is not None and (not isinstance(rec["r"], int) or isinstance(rec["r"], bool) or rec["r"] < 0):
        raise ValueError("r is not a non-negative integer or null")
    latency = rec["latency_ms"]
    if not isinstance(latency, dict) or not _number(latency.get("median")) or latency["median"] <= 0:
        raise ValueError("needs latency_ms.median, a positive finite number of milliseconds")
    _check_numbers(latency, "latency_ms", ("p10", "p90", "mean", "min", "max", "spread", "runs"))
    if rec.get("throughput_per_s") is not None and not _number(rec["throughput_per_s"]):
        raise ValueError("throughput_per_s is not a finite number")
    if rec.get("breakdown") is not None:
        breakdown = rec["breakdown"]
        _check_numbers(breakdown, "breakdown", ("merge_share", "coverage", "merge_ms", "run_ms", "kernel_sum_ms"))
        if breakdown.get("consistent") is not None and not isinstance(breakdown["consistent"], bool):
            raise ValueError("breakdown.consistent is not true/false")
        for key in ("by_layer", "merge_by_layer", "by_op"):
            if breakdown.get(key) is not None:
                _check_numbers(breakdown[key], f"breakdown.{key}", tuple(breakdown[key]))
    if rec.get("fidelity") is not None:
        _check_numbers(rec["fidelity"], "fidelity", ("cosine", "cosine_min", "top1_agreement"))
    if rec.get("predicted") is not None:
        _check_numbers(rec["predicted"], "predicted", ("speedup_vs_r0", "flop_ratio", "merge_cost", "latency_ratio"))
    if rec.get("source") is not None and not isinstance(rec["source"], str):
        raise ValueError("source is not a string")
    if _depth(rec, MAX_DEPTH) > MAX_DEPTH:
        raise ValueError(f"is nested deeper than {MAX_DEPTH} levels")


class ResultStore:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_db_path()
        self.unreadable = 0  # rows the last records() call left out (malformed, from older versions)
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
        """Insert records in one transaction; records whose id is already stored are skipped.

        Every record is validated first: one bad record stores nothing (UserError)."""
        records = list(records)
        for index, rec in enumerate(records):
            try:
                validate_record(rec)
            except ValueError as exc:
                raise UserError(f"result #{index} {exc}; nothing was stored") from None
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
        # Rows stored by older versions (before records were validated) that readers can't use
        # are left out and counted, not allowed to crash the report.
        records, self.unreadable = [], 0
        for (text,) in rows:
            try:
                record = json.loads(text)
                validate_record(record)
            except (ValueError, TypeError, RecursionError):
                self.unreadable += 1
                continue
            records.append(record)
        return records


def results_document(records: list[dict]) -> dict:
    """The JSON file format shared by ``report --json`` and ``import-results``."""
    return {"schema": RESULTS_SCHEMA, "schema_version": RESULTS_SCHEMA_VERSION, "results": records}


def read_results_file(path: str | Path) -> list[dict]:
    """Validate a results JSON file (e.g. measured on a Jetson or a phone) and return its records."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist")
    def reject(constant: str):
        raise ValueError(f"{constant} is not a number JSON allows")

    try:
        document = json.loads(path.read_bytes().decode("utf-8"), parse_constant=reject)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is not valid JSON: {first_line(exc, 200)}") from None
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be a results file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(document, dict) or document.get("schema") != RESULTS_SCHEMA:
        raise UserError(f'{path} is not a tome-export results file (need "schema": "{RESULTS_SCHEMA}")')
    version = document.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{path}: schema_version is not an integer")
    if version > RESULTS_SCHEMA_VERSION:
        raise UserError(f"{path} has results schema version {document['schema_version']}; upgrade tome-export")
    records = document.get("results")
    if not isinstance(records, list):
        raise UserError(f'{path}: "results" must be a list of records')
    for index, rec in enumerate(records):
        try:
            validate_record(rec)
        except ValueError as exc:
            raise UserError(f"{path}: result #{index} {exc}; nothing was imported") from None
        rec.setdefault("source", "imported")
    return records
