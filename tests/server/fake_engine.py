"""A small stand-in for core.models + core.session that honours the contract in docs/architecture.md.

Inversion = ``project_steps + tune_steps`` sleeps of ``step_s`` with ``check_cancel`` between steps and a
progress call after each; render = input RGB shifted by the edits' colour vectors inside the selection,
alpha = selection × input alpha, outside untouched.  Every step start is recorded for the cancel tests.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from core.common import InvalidInput, check_cancel
from server.engine import Engine

DIRECTIONS = {"smile": np.array([0.20, 0.0, 0.0], np.float32), "age": np.array([0.0, 0.0, 0.25], np.float32),
              "light": np.array([0.1, 0.1, 0.1], np.float32)}


@dataclass
class FakeOptions:
    method: str = "pti"
    align: str = "auto"
    project_steps: Optional[int] = None
    tune_steps: Optional[int] = None
    feather: float = 8.0
    blend: str = "alpha"
    seed: int = 0
    locality: bool = False
    segments: object = "selection"  # core.session.SessionOptions.segments: a name or an (H,W) label map


class StepLog:
    """Start times (monotonic) of every optimisation step, across all sessions.

    ``path``: also append each step and call to this JSON-lines file, and read them back from it, so a test
    sees what engines in other processes on this machine did (the Ray backend's actors; ``time.monotonic``
    is one clock for the whole machine)."""

    def __init__(self, path=None):
        self.lock = threading.Lock()
        self.path = None if path is None else Path(path)
        self._starts: list = []
        self._calls: list = []

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:  # one short line per write: appends from several processes stay whole
            f.write(json.dumps(record, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)) + "\n")

    def _read(self, kind: str) -> list:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r["value"] for r in rows if r["kind"] == kind]

    def record_start(self) -> None:
        t = time.monotonic()
        with self.lock:
            self._starts.append(t)
            if self.path is not None:
                self._append({"kind": "start", "value": t})

    def record_call(self, G, options, shape) -> None:
        with self.lock:
            self._calls.append({"G": G, "options": options, "shape": shape})
            if self.path is not None:
                self._append({"kind": "call", "value": {"G": G, "options": dataclasses.asdict(options),
                                                        "shape": list(shape)}})

    @property
    def starts(self) -> list:
        return self._starts if self.path is None else self._read("start")

    @property
    def calls(self) -> list:
        if self.path is None:
            return self._calls
        return [dict(c, options=FakeOptions(**c["options"]), shape=tuple(c["shape"])) for c in self._read("call")]

    def after(self, t: float) -> int:
        with self.lock:
            return sum(1 for s in self.starts if s > t)


class FakeSession:
    def __init__(self, image: np.ndarray, selection: Optional[np.ndarray], method: str):
        self.image, self.selection, self.method = image, selection, method

    def render(self, edits=(), feather=None, blend=None, color_match=None) -> np.ndarray:
        shift = np.zeros(3, np.float32)
        for name, strength, *layers in edits:
            if name not in DIRECTIONS:
                raise InvalidInput(f"unknown direction {name!r}")
            shift += strength * DIRECTIONS[name]
        mask = np.ones(self.image.shape[:2], np.float32) if self.selection is None else self.selection
        out = self.image.copy()
        inside = mask > 0
        out[..., :3][inside] = np.clip(self.image[..., :3][inside] + shift, 0.0, 1.0)
        out[..., 3] = mask * self.image[..., 3]
        return out

    def save(self, directory) -> None:
        d = Path(directory)
        np.save(d / "image.npy", self.image)
        if self.selection is not None:
            np.save(d / "selection.npy", self.selection)
        (d / "meta.json").write_text(json.dumps({"method": self.method}))

    @classmethod
    def load(cls, directory, G, directions=None) -> "FakeSession":
        d = Path(directory)
        meta = json.loads((d / "meta.json").read_text())
        sel = np.load(d / "selection.npy") if (d / "selection.npy").exists() else None
        return cls(np.load(d / "image.npy"), sel, meta["method"])


class FakeRegistry:
    def list(self) -> list:
        return [{"name": "fake32", "resolution": 32, "default": True, "spaces": ["w", "w+"], "num_ws": 8,
                 "directions": [{"name": n, "range": [-3, 3]} for n in DIRECTIONS]},
                {"name": "other", "resolution": 32, "directions": [{"name": "light", "range": [-3, 3]}]}]

    def get(self, name: str):
        if name not in ("fake32", "other"):
            raise InvalidInput(f"unknown model {name!r}")
        return SimpleNamespace(generator=f"G:{name}", directions=dict(DIRECTIONS))


def make_session_api(step_s: float, log: StepLog) -> SimpleNamespace:
    def create_session(G, image, selection=None, options=None, progress=None, cancel=None, directions=None):
        if image.ndim != 3 or image.shape[2] != 4 or image.dtype != np.float32:
            raise InvalidInput(f"image must be (H,W,4) float32, got {image.shape} {image.dtype}")
        if selection is not None and selection.shape != image.shape[:2]:
            raise InvalidInput("selection does not match the image")
        options = options or FakeOptions()
        log.record_call(G, options, image.shape)
        p, t = options.project_steps or 4, options.tune_steps or 0
        n = p + t
        for i in range(n):
            check_cancel(cancel)
            log.record_start()
            time.sleep(step_s)
            if progress is not None:
                preview = image[..., :3] if i % 2 == 0 else None
                progress("project" if i < p else "tune", (i + 1) / n, f"step {i + 1}/{n}", preview)
        check_cancel(cancel)
        return FakeSession(image.copy(), None if selection is None else selection.copy(), options.method)

    return SimpleNamespace(create_session=create_session, EditSession=FakeSession, SessionOptions=FakeOptions)


def make_engine(config=None, step_s: Optional[float] = None, log: Optional[StepLog] = None) -> Engine:
    """Factory (also used by ``python -m server --engine fake_engine:make_engine``); FAKE_STEP_S sets the step.
    ``config`` may carry ``fake_step_s`` and ``fake_step_log`` (a StepLog file path): how the Ray backend's
    actors build this engine (server.ray_backend.WorkerSpec.factory_config)."""
    if step_s is None:
        step_s = getattr(config, "fake_step_s", None) or float(os.environ.get("FAKE_STEP_S", "0.02"))
    log = log or StepLog(getattr(config, "fake_step_log", None))
    engine = Engine(FakeRegistry(), make_session_api(step_s, log), "cpu", lambda: "fake-backbone")
    engine.step_log = log
    return engine
