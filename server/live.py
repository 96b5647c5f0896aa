"""The live-session cache: loaded sessions kept in memory (each may hold a tuned generator), least recently used out."""
from __future__ import annotations

import collections
import threading


class LiveSessions:
    """Thread-safe LRU of loaded ``EditSession`` objects keyed by session id, at most ``max_items``."""

    def __init__(self, max_items: int):
        self.max_items = max(1, max_items)
        self._items: "collections.OrderedDict[str, object]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, sid: str, session) -> None:
        with self._lock:
            self._items[sid] = session
            self._items.move_to_end(sid)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get(self, sid: str):
        with self._lock:
            s = self._items.get(sid)
            if s is not None:
                self._items.move_to_end(sid)
            return s

    def drop(self, sid: str) -> None:
        with self._lock:
            self._items.pop(sid, None)
