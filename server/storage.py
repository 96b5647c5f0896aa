"""Persistence: job and session metadata in SQLite, inputs and session state in files under the data dir.

Layout under ``data_dir``::

    latent-edit.sqlite3        jobs + sessions tables (WAL)
    jobs/<job_id>/item<i>.layer.npy, item<i>.selection.npy, thumb.png   inputs, written before queueing
    sessions/<session_id>/     whatever EditSession.save wrote (torch tensors + JSON, never pickle)

Inputs are loaded with ``allow_pickle=False``.  One connection is shared by the event loop and the
worker threads behind a lock; every statement is tiny.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '', progress REAL NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '',
    error TEXT, error_message TEXT, params TEXT NOT NULL, session_ids TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, inputs_bytes INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, started REAL, finished REAL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, item INTEGER NOT NULL, state TEXT NOT NULL,
    model TEXT NOT NULL, method TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
    x INTEGER NOT NULL, y INTEGER NOT NULL, format TEXT NOT NULL, name TEXT,
    created REAL NOT NULL, last_used REAL NOT NULL, size_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_lru ON sessions(state, last_used);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created);
"""

JOB_COLUMNS = ("id", "kind", "state", "stage", "progress", "message", "error", "error_message", "params",
               "session_ids", "attempts", "inputs_bytes", "created", "started", "finished")
SESSION_COLUMNS = ("id", "job_id", "item", "state", "model", "method", "width", "height", "x", "y", "format",
                   "name", "created", "last_used", "size_bytes")


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Storage:
    """SQLite metadata + file areas.  Rows come back as plain dicts (JSON columns decoded)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.sessions_dir = self.data_dir / "sessions"
        for d in (self.data_dir, self.jobs_dir, self.sessions_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.data_dir / "latent-edit.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- files -----------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def session_dir(self, session_id: str) -> Path:
        return self.sessions_dir / session_id

    def save_inputs(self, job_id: str, items: list) -> int:
        """Write each item's (layer, selection-or-None) arrays; returns the bytes written."""
        d = self.job_dir(job_id)
        d.mkdir(parents=True, exist_ok=True)
        for i, (layer, selection) in enumerate(items):
            _atomic_save_npy(d / f"item{i}.layer.npy", layer)
            if selection is not None:
                _atomic_save_npy(d / f"item{i}.selection.npy", selection)
        return dir_size(d)

    def load_inputs(self, job_id: str, count: int) -> list:
        d = self.job_dir(job_id)
        out = []
        for i in range(count):
            layer = np.load(d / f"item{i}.layer.npy", allow_pickle=False)
            sp = d / f"item{i}.selection.npy"
            out.append((layer, np.load(sp, allow_pickle=False) if sp.exists() else None))
        return out

    def has_inputs(self, job_id: str) -> bool:
        return (self.job_dir(job_id) / "item0.layer.npy").exists()

    def delete_inputs(self, job_id: str) -> None:
        d = self.job_dir(job_id)
        for f in d.glob("item*.npy"):
            f.unlink(missing_ok=True)
        self.update_job(job_id, inputs_bytes=0)

    # --- rows ------------------------------------------------------------------------------------
    def _exec(self, sql: str, args: Iterable = ()):
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def insert_job(self, job: dict, sessions: list) -> None:
        """Insert a job and its sessions in one transaction (after its inputs are on disk)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                row = dict(job, params=json.dumps(job["params"]), session_ids=json.dumps(job["session_ids"]))
                self._db.execute(f"INSERT INTO jobs ({','.join(row)}) VALUES ({','.join('?' * len(row))})",
                                 tuple(row.values()))
                for s in sessions:
                    self._db.execute(f"INSERT INTO sessions ({','.join(s)}) VALUES ({','.join('?' * len(s))})",
                                     tuple(s.values()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def update_job(self, job_id: str, **fields) -> None:
        if fields:
            sets = ", ".join(f"{k}=?" for k in fields)
            self._exec(f"UPDATE jobs SET {sets} WHERE id=?", [*fields.values(), job_id])

    def update_session(self, session_id: str, **fields) -> None:
        if fields:
            sets = ", ".join(f"{k}=?" for k in fields)
            self._exec(f"UPDATE sessions SET {sets} WHERE id=?", [*fields.values(), session_id])

    def update_sessions_of_job(self, job_id: str, from_states: Iterable[str], **fields) -> None:
        """Update the job's sessions that are currently in one of ``from_states``."""
        from_states = list(from_states)
        sets = ", ".join(f"{k}=?" for k in fields)
        self._exec(f"UPDATE sessions SET {sets} WHERE job_id=? AND state IN ({','.join('?' * len(from_states))})",
                   [*fields.values(), job_id, *from_states])

    @staticmethod
    def _job_row(r) -> dict:
        d = dict(zip(JOB_COLUMNS, r))
        d["params"] = json.loads(d["params"])
        d["session_ids"] = json.loads(d["session_ids"])
        return d

    def get_job(self, job_id: str) -> Optional[dict]:
        rows = self._exec(f"SELECT {','.join(JOB_COLUMNS)} FROM jobs WHERE id=?", [job_id])
        return self._job_row(rows[0]) if rows else None

    def list_jobs(self, limit: int = 100, states: Optional[Iterable[str]] = None) -> list:
        sql, args = f"SELECT {','.join(JOB_COLUMNS)} FROM jobs", []
        if states is not None:
            states = list(states)
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += states
        sql += " ORDER BY created DESC LIMIT ?"
        return [self._job_row(r) for r in self._exec(sql, [*args, limit])]

    def get_session(self, session_id: str) -> Optional[dict]:
        rows = self._exec(f"SELECT {','.join(SESSION_COLUMNS)} FROM sessions WHERE id=?", [session_id])
        return dict(zip(SESSION_COLUMNS, rows[0])) if rows else None

    def mark_interrupted(self) -> list:
        """At start-up: jobs left queued/running by a dead process become ``interrupted``; returns their ids."""
        ids = [r[0] for r in self._exec("SELECT id FROM jobs WHERE state IN ('queued', 'running')")]
        now = time.time()
        for jid in ids:
            self.update_job(jid, state="interrupted", finished=now,
                            message="the server stopped while this job was queued or running; POST /v1/jobs/{id}/retry")
            self.update_sessions_of_job(jid, ["pending"], state="interrupted")
        return ids

    def remove_orphans(self) -> int:
        """At start-up: delete job folders without a row (a crash between saving inputs and recording the job:
        the client never got a job id) and session folders without a ready row."""
        jobs = {r[0] for r in self._exec("SELECT id FROM jobs")}
        ready = {r[0] for r in self._exec("SELECT id FROM sessions WHERE state='ready'")}
        removed = 0
        for folder, keep in ((self.jobs_dir, jobs), (self.sessions_dir, ready)):
            for d in folder.iterdir():
                if d.is_dir() and d.name not in keep:
                    shutil.rmtree(d, ignore_errors=True)
                    removed += 1
        return removed

    def delete_session(self, session_id: str) -> None:
        shutil.rmtree(self.session_dir(session_id), ignore_errors=True)
        self.update_session(session_id, state="deleted", size_bytes=0)

    # --- cache bound -----------------------------------------------------------------------------
    def total_bytes(self) -> int:
        (s,), = self._exec("SELECT COALESCE(SUM(size_bytes), 0) FROM sessions WHERE state='ready'")
        (j,), = self._exec("SELECT COALESCE(SUM(inputs_bytes), 0) FROM jobs")
        return int(s) + int(j)

    def evict(self, max_bytes: int, keep: Iterable[str] = ()) -> list:
        """Drop least-recently-used ready sessions (and inputs of finished jobs) until under ``max_bytes``.

        Never touches ids in ``keep`` nor the inputs of queued/running jobs.  Returns evicted session ids.
        """
        keep = set(keep)
        total = self.total_bytes()
        if total <= max_bytes:
            return []
        candidates = [("session", sid, used, size) for sid, used, size in self._exec(
            "SELECT id, last_used, size_bytes FROM sessions WHERE state='ready'")]
        candidates += [("inputs", jid, fin or 0.0, size) for jid, fin, size in self._exec(
            "SELECT id, finished, inputs_bytes FROM jobs WHERE inputs_bytes > 0 "
            "AND state IN ('done', 'failed', 'cancelled', 'interrupted')")]
        candidates.sort(key=lambda c: c[2])
        evicted = []
        for kind, ident, _used, size in candidates:
            if total <= max_bytes:
                break
            if ident in keep:
                continue
            if kind == "session":
                shutil.rmtree(self.session_dir(ident), ignore_errors=True)
                self.update_session(ident, state="evicted", size_bytes=0)
                evicted.append(ident)
            else:
                self.delete_inputs(ident)
            total -= size
        return evicted
