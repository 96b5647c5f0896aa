"""Persistence: job and session metadata in SQLite, inputs and session state in files under the data dir.

Layout under ``data_dir``::

    latent-edit.sqlite3        jobs + sessions tables (WAL)
    jobs/<job_id>/item<i>.layer.npy, item<i>.selection.npy, thumb.png   inputs, written before queueing
    sessions/<session_id>/     whatever EditSession.save wrote (torch tensors + JSON, never pickle)
    damaged-<time>/            a database that failed to open, with the folders it described (kept for the user)

Everything here is the user's photos: the folder and every folder in it are 0700, every file 0600, whoever
created them (:func:`make_private` runs at start-up; files written here are created 0600).  Inputs are loaded
with ``allow_pickle=False``.  One connection is shared by the event loop and the worker threads behind a lock;
every statement is tiny.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

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
DB_NAME = "latent-edit.sqlite3"
FILE_MODE, DIR_MODE = 0o600, 0o700

log = logging.getLogger("server.storage")


@dataclass(frozen=True)
class Retention:
    """How long finished work is kept (besides the --cache-mb bound)."""

    max_age_days: float = 30.0  # finished jobs and idle sessions older than this are removed; our choice
    max_jobs: int = 500  # finished jobs kept at most (newest first); our choice: a long working week of edits


def make_private(root: Path) -> int:
    """chmod ``root`` and every folder under it 0700 and every file 0600 (symlinks are left alone);
    returns how many entries had to be tightened."""
    fixed = 0
    for path, want in _walk_modes(Path(root)):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == want:
            continue
        try:
            os.chmod(path, want)
            fixed += 1
        except OSError as exc:
            log.warning("cannot make %s private: %s", path, exc.strerror or exc)
    return fixed


def _walk_modes(root: Path):
    yield root, DIR_MODE
    for top, dirs, files in os.walk(root):
        for d in dirs:
            yield os.path.join(top, d), DIR_MODE
        for f in files:
            yield os.path.join(top, f), FILE_MODE


def private_mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    try:
        os.chmod(path, DIR_MODE)
    except OSError as exc:  # not ours (another user's folder): say so, the server still runs
        log.warning("cannot make %s private: %s", path.name, exc.strerror or exc)
    return path


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


def _atomic_write(path: Path, write: Callable) -> None:
    """Write a new file 0600 through ``write(fileobj)``, then move it into place."""
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


class Storage:
    """SQLite metadata + file areas.  Rows come back as plain dicts (JSON columns decoded)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.sessions_dir = self.data_dir / "sessions"
        private_mkdir(self.data_dir)
        tightened = make_private(self.data_dir)
        if tightened:
            log.warning("made %d file(s)/folder(s) in the data folder private (0700/0600): it holds your photos",
                        tightened)
        self._lock = threading.RLock()
        self.recovered: Optional[Path] = None  # where a damaged database was moved at start-up
        self.name_root(self.data_dir, "DATA_DIR")
        try:
            self._db = self._open_db()
        except sqlite3.DatabaseError as exc:
            self.recovered = self._move_damaged_db(exc)
            self._db = self._open_db()
        for d in (self.jobs_dir, self.sessions_dir):
            private_mkdir(d)

    def _open_db(self) -> sqlite3.Connection:
        path = self.data_dir / DB_NAME
        if not path.exists():  # created 0600 here: SQLite gives its -wal and -shm files the same mode
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            (check,), = db.execute("PRAGMA quick_check").fetchall()
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
            db.executescript(SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _move_damaged_db(self, exc: Exception) -> Path:
        """Move the database that failed to open, with the job and session folders it described, into
        ``damaged-<time>/`` (nothing is deleted), and say so; a fresh database is then started."""
        dest = private_mkdir(self.data_dir / time.strftime("damaged-%Y%m%d-%H%M%S"))
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", "jobs", "sessions"):
            if (self.data_dir / name).exists():
                os.replace(self.data_dir / name, dest / name)
        log.error("the database %s is damaged (%s): moved it, with the jobs/ and sessions/ folders it described, "
                  "to %s/ and started a fresh one; earlier sessions must be created again (their files are kept "
                  "there; delete that folder when you no longer need them)", DB_NAME, exc, dest.name)
        return dest

    def name_root(self, path: Path, name: str) -> None:
        """Show ``path`` as ``name`` in messages too (the models folder when it lies outside the data folder)."""
        self._roots = sorted({*getattr(self, "_roots", ()), (str(Path(path).resolve()), name)}, key=lambda r: -len(r[0]))

    def relative(self, text: str) -> str:
        """``text`` with the data folder's absolute path replaced by ``DATA_DIR`` (and other named roots by their
        names): messages never show server paths."""
        text = str(text)
        roots = getattr(self, "_roots", None) or [(str(self.data_dir), "DATA_DIR")]
        for root, name in roots:
            text = text.replace(root + os.sep, name + os.sep).replace(root, name)
        return text

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
        d = private_mkdir(self.job_dir(job_id))
        for i, (layer, selection) in enumerate(items):
            _atomic_save_npy(d / f"item{i}.layer.npy", layer)
            if selection is not None:
                _atomic_save_npy(d / f"item{i}.selection.npy", selection)
        return dir_size(d)

    def save_segments(self, job_id: str, item: int, labels: np.ndarray) -> None:
        """Write item ``item``'s segment label map ``(H,W)`` int32 (options.segments as a map) beside its layer."""
        _atomic_save_npy(private_mkdir(self.job_dir(job_id)) / f"item{item}.segments.npy", labels)

    def load_segments(self, job_id: str, item: int) -> Optional[np.ndarray]:
        """Item ``item``'s label map, or None when it was sent without one."""
        path = self.job_dir(job_id) / f"item{item}.segments.npy"
        return np.load(path, allow_pickle=False) if path.exists() else None

    def save_thumbnail(self, job_id: str, png: bytes) -> None:
        _atomic_write(private_mkdir(self.job_dir(job_id)) / "thumb.png", lambda f: f.write(png))

    def thumbnail(self, job_id: str) -> Optional[bytes]:
        path = self.job_dir(job_id) / "thumb.png"
        return path.read_bytes() if path.exists() else None

    def save_session(self, session_id: str, save: Callable[[Path], None]) -> int:
        """``save(folder)`` writes the session (core's EditSession.save); the folder is made private; returns its bytes."""
        d = self.session_dir(session_id)
        shutil.rmtree(d, ignore_errors=True)
        private_mkdir(d)
        save(d)
        make_private(d)  # core writes with the process umask
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
        """Remove the job's input arrays (its thumbnail stays for the status page); the job's bytes are recounted."""
        d = self.job_dir(job_id)
        for f in d.glob("item*.npy"):
            f.unlink(missing_ok=True)
        self.update_job(job_id, inputs_bytes=dir_size(d) if d.is_dir() else 0)

    def delete_job_files(self, job_id: str) -> None:
        """Remove the job's folder: inputs and thumbnail, everything derived from its photos."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
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

    def sessions_of_job(self, job_id: str, states: Iterable[str]) -> list:
        states = list(states)
        return [r[0] for r in self._exec(f"SELECT id FROM sessions WHERE job_id=? AND state IN "
                                         f"({','.join('?' * len(states))}) ORDER BY item", [job_id, *states])]

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
        """Delete the session's files and, with them, everything derived from its photo: the job's inputs and
        thumbnail go once no other session of that job could still need them (a batch keeps them for the others)."""
        shutil.rmtree(self.session_dir(session_id), ignore_errors=True)
        self.update_session(session_id, state="deleted", size_bytes=0)
        row = self.get_session(session_id)
        if row is not None:
            others = self.sessions_of_job(row["job_id"], ["ready", "pending", "damaged", "failed", "cancelled",
                                                          "interrupted"])
            if not others:
                self.delete_job_files(row["job_id"])
            else:
                d = self.job_dir(row["job_id"])
                for f in d.glob(f"item{row['item']}.*.npy"):
                    f.unlink(missing_ok=True)
                if row["item"] == 0:
                    (d / "thumb.png").unlink(missing_ok=True)
                self.update_job(row["job_id"], inputs_bytes=dir_size(d))

    def apply_retention(self, retention: Retention, keep: Iterable[str] = (), keep_jobs: Iterable[str] = (),
                        now: Optional[float] = None) -> tuple:
        """Evict ready sessions idle longer than ``max_age_days``; remove finished jobs (rows, their sessions'
        rows, folders) older than that or beyond the newest ``max_jobs``, unless one of their sessions is still
        ready.  Returns ``(evicted session ids, removed job ids)``."""
        now = time.time() if now is None else now
        cutoff = now - retention.max_age_days * 86400.0
        keep, keep_jobs = set(keep), set(keep_jobs)
        evicted = []
        for (sid,) in self._exec("SELECT id FROM sessions WHERE state='ready' AND last_used < ?", [cutoff]):
            if sid not in keep:
                shutil.rmtree(self.session_dir(sid), ignore_errors=True)
                self.update_session(sid, state="evicted", size_bytes=0)
                evicted.append(sid)
        finished = self._exec("SELECT id, COALESCE(finished, created) FROM jobs WHERE state IN "
                              "('done', 'failed', 'cancelled', 'interrupted') ORDER BY COALESCE(finished, created) DESC")
        ready = {r[0] for r in self._exec("SELECT DISTINCT job_id FROM sessions WHERE state='ready'")}
        removed = []
        for rank, (jid, when) in enumerate(finished):
            if (rank >= retention.max_jobs or when < cutoff) and jid not in ready and jid not in keep_jobs:
                shutil.rmtree(self.job_dir(jid), ignore_errors=True)
                for (sid,) in self._exec("SELECT id FROM sessions WHERE job_id=?", [jid]):
                    shutil.rmtree(self.session_dir(sid), ignore_errors=True)
                with self._lock:
                    self._exec("DELETE FROM sessions WHERE job_id=?", [jid])
                    self._exec("DELETE FROM jobs WHERE id=?", [jid])
                removed.append(jid)
        return evicted, removed

    # --- cache bound -----------------------------------------------------------------------------
    def total_bytes(self) -> int:
        (s,), = self._exec("SELECT COALESCE(SUM(size_bytes), 0) FROM sessions WHERE state='ready'")
        (j,), = self._exec("SELECT COALESCE(SUM(inputs_bytes), 0) FROM jobs")
        return int(s) + int(j)

    def evict(self, max_bytes: int, keep: Iterable[str] = ()) -> list:
        """Bring the data folder under ``max_bytes``: first the files of finished jobs (kept inputs, thumbnails;
        oldest first), then least-recently-used ready sessions.

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
        candidates.sort(key=lambda c: (c[0] == "session", c[2]))
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
                self.delete_job_files(ident)
            total -= size
        return evicted
