"""The server's jobs, durable: one SQLite database (stdlib `sqlite3`) in the store directory, in WAL
mode with `synchronous=FULL`, so that a job's state is on disk before the request that changed it
returns. Nothing about a job is held only in memory: the worker, the API and the metrics read it
here. Every change is one transaction, serialised by a lock (the API's threads and the worker share
the connection).

States: queued -> running -> succeeded | failed | cancelled; queued -> cancelled. A job running when
the server stops cleanly goes back to the queue (`requeue`); one that was running when the server
died is queued again once at the next start (`recover`), and failed with the reason if it was
already such a second attempt."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from ..core.errors import CVFastError

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
ATTEMPTS = 2  # a job interrupted by the server's death runs once more, then fails
MEDIA = ("image", "video")  # arguments holding a base64 file, shown by size only

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: the queue's order
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    arguments TEXT NOT NULL,                -- JSON, as submitted (validated)
    seed INTEGER NOT NULL,                  -- the seed the job runs with, chosen at submission
    step INTEGER NOT NULL DEFAULT 0,        -- denoising steps done
    steps INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0,      -- a cancel asked while it runs: the worker stops at its next step
    created REAL NOT NULL, started REAL, finished REAL,
    error TEXT, video TEXT, timings TEXT
)"""


class QueueFull(CVFastError):
    """The queue holds its maximum of waiting jobs."""


class Store:
    def __init__(self, path: Path):
        self.path, self.lock = Path(path), threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(SCHEMA)

    def transaction(self, sql: str, *params) -> list[sqlite3.Row]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                rows = self.db.execute(sql, params).fetchall()
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return rows

    def add(self, arguments: dict, seed: int, steps: int, max_queue: int) -> dict:
        """A new queued job, unless `max_queue` jobs already wait (QueueFull)."""
        job_id = uuid.uuid4().hex
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                waiting = self.db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                if waiting >= max_queue:
                    raise QueueFull(f"the queue is full ({waiting} jobs waiting, --max-queue {max_queue})")
                self.db.execute("INSERT INTO jobs (id, status, arguments, seed, steps, created) "
                                "VALUES (?, 'queued', ?, ?, ?, ?)", (job_id, json.dumps(arguments), seed, steps,
                                                                     time.time()))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            ahead = self.db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?",
                                    (row["seq"],)).fetchone()[0]
        return view(row, ahead)

    def arguments(self, job_id: str) -> dict:
        """The job's arguments as submitted, its base64 files whole (`get` shows their size only)."""
        with self.lock:
            return json.loads(self.db.execute("SELECT arguments FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])

    def recent(self, limit: int = 20) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [view(row, None) for row in rows]

    def claim(self) -> dict | None:
        """The oldest queued job, now running (its attempt counted), or None."""
        rows = self.transaction("UPDATE jobs SET status = 'running', attempts = attempts + 1, started = ?, step = 0 "
                                "WHERE seq = (SELECT MIN(seq) FROM jobs WHERE status = 'queued') RETURNING id",
                                time.time())
        return self.get(rows[0]["id"]) if rows else None

    def progress(self, job_id: str, step: int) -> bool:
        """Record `step` steps done; whether a cancel was asked meanwhile."""
        rows = self.transaction("UPDATE jobs SET step = ? WHERE id = ? RETURNING cancel", step, job_id)
        return bool(rows and rows[0]["cancel"])

    def succeed(self, job_id: str, video: str, timings: dict) -> None:
        self.transaction("UPDATE jobs SET status = 'succeeded', video = ?, timings = ?, finished = ? WHERE id = ?",
                         video, json.dumps(timings), time.time(), job_id)

    def fail(self, job_id: str, error: str, status: str = "failed") -> None:
        self.transaction("UPDATE jobs SET status = ?, error = ?, finished = ? WHERE id = ?", status, error, time.time(),
                         job_id)

    def cancel(self, job_id: str) -> dict | None:
        """A queued job is cancelled at once; a running one is asked to stop at its next step (its
        state at this moment returned); a finished one is left as it is."""
        now = time.time()
        self.transaction("UPDATE jobs SET status = CASE status WHEN 'queued' THEN 'cancelled' ELSE status END, "
                         "finished = CASE status WHEN 'queued' THEN ? ELSE finished END, "
                         "cancel = CASE status WHEN 'running' THEN 1 ELSE cancel END WHERE id = ?", now, job_id)
        return self.get(job_id)

    def requeue(self, job_id: str) -> None:
        """A running job back in the queue, its attempt not counted (the server stopped it cleanly)."""
        self.transaction("UPDATE jobs SET status = 'queued', step = 0, attempts = attempts - 1, started = NULL "
                         "WHERE id = ? AND status = 'running'", job_id)

    def recover(self) -> list[str]:
        """At start: jobs that were running when the server died are queued again, or failed when
        they already had their second attempt. Returns their ids."""
        rows = self.transaction("SELECT id, attempts FROM jobs WHERE status = 'running'")
        for row in rows:
            if row["attempts"] >= ATTEMPTS:
                self.fail(row["id"], f"the server stopped while this job ran, {row['attempts']} times; not retried")
            else:
                self.transaction("UPDATE jobs SET status = 'queued', step = 0, cancel = 0 WHERE id = ?", row["id"])
        return [row["id"] for row in rows]

    def counts(self) -> dict[str, int]:
        with self.lock:
            rows = self.db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {status: 0 for status in STATUSES} | {row["status"]: row["n"] for row in rows}

    def durations(self) -> list[tuple[float, float, int]]:
        """(job seconds, denoising seconds, steps) of every succeeded job, for the metrics."""
        with self.lock:
            rows = self.db.execute("SELECT started, finished, timings, steps FROM jobs "
                                   "WHERE status = 'succeeded'").fetchall()
        return [(row["finished"] - row["started"], json.loads(row["timings"]).get("denoising", 0.0), row["steps"])
                for row in rows]


def view(row: sqlite3.Row, ahead: int | None) -> dict:
    """A job as the API shows it."""
    job = {key: row[key] for key in ("id", "status", "seed", "created", "started", "finished", "error", "attempts")}
    job["cancel_asked"] = bool(row["cancel"])
    arguments = {key: f"<{len(value)} base64 characters>" if key in MEDIA else value
                 for key, value in json.loads(row["arguments"]).items()}
    job.update(progress={"step": row["step"], "steps": row["steps"]}, arguments=arguments,
               timings=json.loads(row["timings"]) if row["timings"] else None, video=row["video"],
               queue_position=ahead + 1 if row["status"] == "queued" and ahead is not None else None)
    return job
