"""Small shared pieces: the error hierarchy, cooperative cancellation and progress reporting."""
from __future__ import annotations

import importlib
import threading
from typing import Callable, Optional, Union

CancelLike = Optional[Union[Callable[[], bool], threading.Event]]
ProgressFn = Optional[Callable[..., None]]


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
