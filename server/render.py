"""The renderer: edits of finished sessions on a dedicated thread (never behind a queued inversion).

A session whose folder is gone was evicted (410); one whose files no longer load is *damaged*: it is marked
``damaged`` in the database and the client is told what failed and what to do (409).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from server import protocol
from server.engine import render_session
from server.live import LiveSessions
from server.storage import Storage

log = logging.getLogger("server.render")


class SessionDamaged(Exception):
    """The session's saved files exist but cannot be loaded; ``message`` says which problem, for the client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Renderer:
    """``render(row, req)`` -> the wire answer; loads sessions through ``live`` (an LRU of loaded sessions)."""

    def __init__(self, storage: Storage, engine, live: LiveSessions):
        self.storage, self.engine, self.live = storage, engine, live
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latent-edit-render")

    def session(self, row: dict):
        """The loaded session of ``row``: FileNotFoundError when its folder is gone, SessionDamaged when it fails to load."""
        s = self.live.get(row["id"])
        if s is None:
            d = self.storage.session_dir(row["id"])
            if not d.is_dir():
                raise FileNotFoundError(d)
            try:
                s = self.engine.load(d, row["model"])
            except MemoryError:
                raise
            except Exception as exc:  # torch's UnpicklingError / RuntimeError, JSON errors, missing files...
                what = self.storage.relative(f"{exc.__class__.__name__}: {exc}")[:300]
                log.warning("session %s is damaged: %s", row["id"], what)
                self.storage.update_session(row["id"], state="damaged")
                raise SessionDamaged(
                    f"the saved state of session {row['id']} is damaged and cannot be loaded ({what}); "
                    f"DELETE /v1/sessions/{row['id']} and create it again from the layer") from None
            self.live.put(row["id"], s)
        return s

    def render(self, row: dict, req: "protocol.RenderRequest") -> dict:
        """Blocking: one generator forward + compositing, encoded for the wire."""
        t0 = time.perf_counter()
        session = self.session(row)
        out, meta = render_session(session, req)  # edits (+ segments), fusion -> core; segment metadata back
        out = np.asarray(out)
        if out.shape != (row["height"], row["width"], 4):
            raise RuntimeError(f"engine returned {out.shape}, expected {(row['height'], row['width'], 4)}")
        layer = protocol.encode_layer(out, req.format or row["format"], row["x"], row["y"], row["name"])
        self.storage.update_session(row["id"], last_used=time.time())
        return {"session_id": row["id"], "layer": layer, **meta,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
