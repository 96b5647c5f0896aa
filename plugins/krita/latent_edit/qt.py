"""Qt bindings (PyQt5 in Krita 5, PyQt6 in Krita 6) and the two event-loop helpers the plugin needs.
Enums are written fully scoped (``Qt.Orientation.Horizontal``), which both bindings accept."""
from __future__ import annotations

import threading
import traceback

try:
    from PyQt5.QtCore import Qt, QTimer  # noqa: F401
    from PyQt5 import QtGui, QtWidgets  # noqa: F401
except ImportError:  # Krita 6
    from PyQt6.QtCore import Qt, QTimer  # noqa: F401
    from PyQt6 import QtGui, QtWidgets  # noqa: F401


def drive(gen, on_done=None, on_error=None):
    """Run a step generator on the Qt event loop: each yielded value is a delay in ms before the next step."""
    def step():
        try:
            ms = next(gen)
        except StopIteration as stop:
            if on_done is not None:
                on_done(stop.value)
            return
        except BaseException as e:  # noqa: BLE001 - reported, never raised into Qt (a modal dialog would block)
            if on_error is not None:
                on_error(e)
            else:
                traceback.print_exc()
            return
        QTimer.singleShot(max(0, int(ms)), step)

    QTimer.singleShot(0, step)


def in_background(fn, on_done, poll_ms: int = 50):
    """Call ``fn()`` on a thread; ``on_done(result, error)`` later on the UI thread (QTimer polling)."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def poll():
        if t.is_alive():
            QTimer.singleShot(poll_ms, poll)
        else:
            on_done(box.get("result"), box.get("error"))

    QTimer.singleShot(poll_ms, poll)
