"""The job record: one inversion request (a session or a batch), its state, progress and outcome.

States: ``queued -> running -> done | failed | cancelled``; jobs found queued/running at start-up are
``interrupted`` (re-runnable).  ``version`` grows with every change a client can see, so a client that
long-polls ``GET /v1/jobs/{id}?after=VERSION`` is answered at the next change.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

TERMINAL = frozenset({"done", "failed", "cancelled", "interrupted"})
RETRYABLE = frozenset({"failed", "cancelled", "interrupted"})


class QueueFull(Exception):
    pass


class JobConflict(Exception):
    """The job exists but is in a state that forbids the request (``status`` 409 or 410)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Job:
    id: str
    kind: str  # "session" | "batch"
    params: dict  # {"model", "options", "timeout_s", "items": [{"width", "height", "x", "y", "format", "name", "selection"}]}
    session_ids: list
    state: str = "queued"
    stage: str = ""
    step: int = 0  # within the current stage (core.common.ProgressEvent.step / .total)
    total: int = 0
    progress: float = 0.0  # overall 0..1 of the whole job (all items)
    message: str = ""
    error: Optional[str] = None
    error_message: Optional[str] = None
    attempts: int = 0
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    cancel: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False
    preview_png: Optional[bytes] = None
    preview_seq: int = 0
    version: int = 0
    _last_event: float = 0.0
    _last_persist: float = 0.0
    _last_preview: float = 0.0

    @classmethod
    def from_row(cls, row: dict) -> "Job":
        keys = ("id", "kind", "params", "session_ids", "state", "stage", "progress", "message", "error",
                "error_message", "attempts", "created", "started", "finished")
        return cls(**{k: row[k] for k in keys})

    def public(self, queue_position: Optional[int] = None) -> dict:
        return {
            "job_id": self.id, "kind": self.kind, "state": self.state, "stage": self.stage,
            "step": self.step, "total": self.total,
            "progress": round(float(self.progress), 4), "message": self.message,
            "error": None if self.error is None else {"error": self.error, "message": self.error_message},
            "session_ids": list(self.session_ids), "attempts": self.attempts,
            "created": self.created, "started": self.started, "finished": self.finished,
            "cancel_requested": self.cancel.is_set() and self.state == "running",
            "queue_position": queue_position, "preview_seq": self.preview_seq, "version": self.version,
        }
