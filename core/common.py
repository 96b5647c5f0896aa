"""Small shared pieces: the error hierarchy, cooperative cancellation and progress reporting."""
from __future__ import annotations

import dataclasses
import importlib
import threading
from typing import Callable, Mapping, Optional, Union

CancelLike = Optional[Union[Callable[[], bool], threading.Event]]


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """One progress report of long-running work, the same type from the core loops to the server's job record.

    ``stage``: "align", "project", "tune", "refine" or "render"; ``step`` of ``total`` within that stage;
    ``fraction`` the whole job's progress in [0,1] (a loop reports ``step/total``; a caller running several
    stages rescales it with ``dataclasses.replace``, see :class:`Stages`); ``message`` user-facing words
    ("Projecting 44/300"); ``loss`` the current objective (None when there is none); ``preview`` None or the
    current image ``(H,W,3)`` uint8.
    """

    stage: str
    step: int
    total: int
    fraction: float
    message: str
    loss: Optional[float] = None
    preview: Optional[object] = None


ProgressFn = Optional[Callable[[ProgressEvent], None]]

# user-facing wording of each stage's steps ("Projecting 44/300")
STAGE_WORDS = {"align": "Finding the face", "project": "Projecting", "tune": "Tuning the generator",
               "refine": "Filling the hole", "render": "Rendering"}


def preview_image(img) -> Optional[object]:
    """The first image of ``img`` (a tensor ``(N,3,H,W)`` / ``(3,H,W)`` in [-1,1]) as ``(H,W,3)`` uint8; None -> None."""
    if img is None:
        return None
    import torch

    x = img.detach()
    x = x[0] if x.ndim == 4 else x
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def report_step(progress: ProgressFn, stage: str, step: int, total: int, loss: Optional[float] = None,
                preview=None) -> None:
    """Send ``step``/``total`` of ``stage`` to ``progress`` (if any) as a :class:`ProgressEvent`; ``preview`` a
    tensor image (converted with :func:`preview_image`) or None."""
    if progress is None:
        return
    total = max(int(total), 1)
    progress(ProgressEvent(stage, int(step), total, min(max(step / total, 0.0), 1.0),
                           f"{STAGE_WORDS.get(stage, stage.capitalize())} {int(step)}/{total}",
                           None if loss is None else float(loss), preview_image(preview)))


class Stages:
    """Rescales each stage's events onto one overall fraction of a multi-stage job.

    ``Stages(progress, {"project": 450, "tune": 350})`` weights the stages by their work (zero-weight stages
    still pass their events, at the fraction reached so far); ``stages.callback("tune")`` is the
    ``progress`` argument for that stage's loop; ``stages.say(stage, fraction, message)`` reports a step-less
    moment ("Finding the face").
    """

    def __init__(self, progress: ProgressFn, weights: Mapping[str, float]):
        self.progress = progress
        self.weights = {k: max(float(v), 0.0) for k, v in weights.items()}
        self.total = sum(self.weights.values()) or 1.0

    def _range(self, first: str, last: str) -> tuple[float, float]:
        """(start, end) of the stages ``first``..``last`` (in weight order) as fractions of the whole job."""
        done, start, end = 0.0, None, None
        for name, w in self.weights.items():
            if name == first:
                start = done
            done += w
            if name == last:
                end = done
                break
        if start is None or end is None:
            raise KeyError(f"unknown stage range {first!r}..{last!r}")
        return start / self.total, end / self.total

    def overall(self, stage: str, fraction: float) -> float:
        """The whole job's fraction when ``stage`` is ``fraction`` (0..1) done."""
        start, end = self._range(stage, stage)
        return start + (end - start) * min(max(fraction, 0.0), 1.0)

    def span(self, first: str, last: str) -> ProgressFn:
        """The ``progress`` argument for work whose own fraction covers the stages ``first``..``last``."""
        if self.progress is None:
            return None
        start, end = self._range(first, last)

        def forward(event: ProgressEvent) -> None:
            f = start + (end - start) * min(max(event.fraction, 0.0), 1.0)
            self.progress(dataclasses.replace(event, fraction=f))

        return forward

    def callback(self, stage: str) -> ProgressFn:
        """The ``progress`` argument for the loop of ``stage``."""
        return self.span(stage, stage)

    def say(self, stage: str, fraction: float, message: str, preview=None) -> None:
        if self.progress is not None:
            step = 1 if fraction >= 1 else 0
            self.progress(ProgressEvent(stage, step, 1, self.overall(stage, fraction), message, None, preview))


class LatentEditError(Exception):
    """Base class for errors a user can act on; ``str(err)`` is the message shown to them."""

    code = "error"


class InvalidInput(LatentEditError, ValueError):
    """Bad input from the caller (wrong size, empty selection, NaN...)."""

    code = "invalid_input"


class NoFace(InvalidInput):
    """The layer (or the selected part of it) holds no usable face."""

    code = "no_face"


class Cancelled(LatentEditError):
    """Raised between optimisation steps when the caller asked to stop."""

    code = "cancelled"


def is_cancelled(cancel: CancelLike) -> bool:
    """True when ``cancel`` (a callable returning bool, a threading.Event, or None) asks to stop."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def check_cancel(cancel: CancelLike) -> None:
    """Raise :class:`Cancelled` when ``cancel`` asks to stop."""
    if is_cancelled(cancel):
        raise Cancelled("cancelled by the user")


def lazy_exports(package: str, exports: dict, namespace: dict, names: list):
    """``(__getattr__, __dir__)`` for a package that imports ``exports`` (``{name: module}``) on first use.

    ``namespace`` is the package's ``globals()`` (a loaded name is cached there); ``names`` is its ``__all__``."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__():
        return names

    return __getattr__, __dir__
