"""Job records in a SQLite file: the embedded deployment's record store.

SQLite in WAL mode lets the API process and the local worker processes read
and write the same file safely; every read-modify-write runs in a
``BEGIN IMMEDIATE`` transaction, so concurrent updates serialize.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .records import (
    DURATION_BUCKETS,
    IdempotencyConflictError,
    JobRecord,
    Mutator,
    RecordBackend,
    bucket_index,
    decode_cursor,
    encode_cursor,
    histogram_from_counts,
    sort_key,
    time_key,
)

__all__ = ["SqliteRecords"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    sort_key TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_owner_key ON jobs (owner, sort_key);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS idempotency (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    fingerprint TEXT,
    PRIMARY KEY (owner, key)
);
CREATE TABLE IF NOT EXISTS blob_owners (
    kind TEXT NOT NULL,
    blob_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (kind, blob_id, owner)
);
CREATE TABLE IF NOT EXISTS rate (
    key TEXT PRIMARY KEY,
    window INTEGER NOT NULL,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (name TEXT PRIMARY KEY, seen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS durations (bucket INTEGER PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS duration_totals (
    id INTEGER PRIMARY KEY CHECK (id = 0), total REAL NOT NULL, count INTEGER NOT NULL
);
"""


class SqliteRecords(RecordBackend):
    """`RecordBackend` on a SQLite database file.

    Parameters
    ----------
    path : `pathlib.Path`
        Database file (created with its schema if missing).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)  # idempotent (IF NOT EXISTS)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid != os.getpid():
            db = None  # a connection must not cross a fork (Celery prefork children)
        if db is None:
            self._local.pid = os.getpid()
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self):
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _write(db: sqlite3.Connection, record: JobRecord) -> None:
        db.execute(
            "INSERT OR REPLACE INTO jobs (id, owner, state, sort_key, data) VALUES (?, ?, ?, ?, ?)",
            (record.id, record.owner, record.state, sort_key(record), record.to_json()),
        )

    def create(self, record, fingerprint=None):
        with self._transaction() as db:
            if record.idempotency_key is not None:
                row = db.execute(
                    "SELECT job_id, fingerprint FROM idempotency WHERE owner = ? AND key = ?",
                    (record.owner, record.idempotency_key),
                ).fetchone()
                if row is not None:
                    existing = db.execute(
                        "SELECT data FROM jobs WHERE id = ?", (row[0],)
                    ).fetchone()
                    if existing is not None:
                        if fingerprint is not None and row[1] != fingerprint:
                            raise IdempotencyConflictError(row[0])
                        return JobRecord.from_json(existing[0]), False
                db.execute(
                    "INSERT OR REPLACE INTO idempotency (owner, key, job_id, fingerprint) "
                    "VALUES (?, ?, ?, ?)",
                    (record.owner, record.idempotency_key, record.id, fingerprint),
                )
            self._write(db, record)
        return record, True

    def get(self, job_id):
        row = self._connection().execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.from_json(row[0]) if row else None

    def update(self, job_id, mutate: Mutator):
        with self._transaction() as db:
            row = db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None, False
            record = JobRecord.from_json(row[0])
            if not mutate(record):
                return JobRecord.from_json(row[0]), False
            record.updated_at = time.time()
            self._write(db, record)
        return record, True

    def delete(self, job_id):
        with self._transaction() as db:
            gone = db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount
            db.execute("DELETE FROM idempotency WHERE job_id = ?", (job_id,))
        return bool(gone)

    def list(self, owner, state=None, since=None, limit=50, cursor=None):
        clauses, params = ["owner = ?"], [owner]
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        if since is not None:
            clauses.append("sort_key >= ?")
            params.append(time_key(since))
        if cursor is not None:
            clauses.append("sort_key < ?")
            params.append(decode_cursor(cursor))
        rows = (
            self._connection()
            .execute(
                f"SELECT data FROM jobs WHERE {' AND '.join(clauses)} "
                "ORDER BY sort_key DESC LIMIT ?",
                (*params, limit + 1),
            )
            .fetchall()
        )
        records = [JobRecord.from_json(row[0]) for row in rows[:limit]]
        next_cursor = encode_cursor(sort_key(records[-1])) if len(rows) > limit else None
        return records, next_cursor

    def count_active(self, owner):
        row = (
            self._connection()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE owner = ? AND state IN ('queued', 'running')",
                (owner,),
            )
            .fetchone()
        )
        return int(row[0])

    def state_counts(self):
        rows = self._connection().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {state: int(n) for state, n in rows}

    def in_state(self, state):
        rows = self._connection().execute("SELECT data FROM jobs WHERE state = ?", (state,))
        return [JobRecord.from_json(row[0]) for row in rows]

    def observe_duration(self, seconds):
        with self._transaction() as db:
            db.execute(
                "INSERT INTO durations (bucket, count) VALUES (?, 1) "
                "ON CONFLICT (bucket) DO UPDATE SET count = count + 1",
                (bucket_index(seconds),),
            )
            db.execute(
                "INSERT INTO duration_totals (id, total, count) VALUES (0, ?, 1) "
                "ON CONFLICT (id) DO UPDATE SET total = total + excluded.total, count = count + 1",
                (float(seconds),),
            )

    def duration_histogram(self):
        db = self._connection()
        counts = dict(db.execute("SELECT bucket, count FROM durations").fetchall())
        totals = db.execute("SELECT total, count FROM duration_totals WHERE id = 0").fetchone()
        per_bucket = [int(counts.get(i, 0)) for i in range(len(DURATION_BUCKETS) + 1)]
        total, count = totals if totals else (0.0, 0)
        return histogram_from_counts(per_bucket, float(total), int(count))

    def add_owner(self, kind, blob_id, owner):
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO blob_owners (kind, blob_id, owner) VALUES (?, ?, ?)",
                (kind, blob_id, owner),
            )

    def remove_owner(self, kind, blob_id, owner):
        with self._transaction() as db:
            db.execute(
                "DELETE FROM blob_owners WHERE kind = ? AND blob_id = ? AND owner = ?",
                (kind, blob_id, owner),
            )
            row = db.execute(
                "SELECT COUNT(*) FROM blob_owners WHERE kind = ? AND blob_id = ?", (kind, blob_id)
            ).fetchone()
        return int(row[0])

    def forget_blob(self, kind, blob_id):
        with self._transaction() as db:
            db.execute("DELETE FROM blob_owners WHERE kind = ? AND blob_id = ?", (kind, blob_id))

    def is_owner(self, kind, blob_id, owner):
        row = (
            self._connection()
            .execute(
                "SELECT 1 FROM blob_owners WHERE kind = ? AND blob_id = ? AND owner = ?",
                (kind, blob_id, owner),
            )
            .fetchone()
        )
        return row is not None

    def hit(self, key, window):
        current = int(time.time() // window)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO rate (key, window, count) VALUES (?, ?, 1) "
                "ON CONFLICT (key) DO UPDATE SET "
                "count = CASE WHEN window = excluded.window THEN count + 1 ELSE 1 END, "
                "window = excluded.window",
                (key, current),
            )
            row = db.execute("SELECT count FROM rate WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    def count(self, key, window):
        current = int(time.time() // window)
        row = (
            self._connection()
            .execute("SELECT count FROM rate WHERE key = ? AND window = ?", (key, current))
            .fetchone()
        )
        return int(row[0]) if row is not None else 0

    def worker_seen(self, name):
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO workers (name, seen_at) VALUES (?, ?)", (name, time.time())
            )

    def worker_gone(self, name):
        with self._transaction() as db:
            db.execute("DELETE FROM workers WHERE name = ?", (name,))

    def live_workers(self, max_age):
        rows = self._connection().execute(
            "SELECT name FROM workers WHERE seen_at >= ?", (time.time() - max_age,)
        )
        return [row[0] for row in rows]

    def ping(self):
        self._connection().execute("SELECT 1").fetchone()

    def close(self):
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
