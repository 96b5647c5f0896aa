"""The Krita extension: the "Latent Edit…" action in the Filter menu, the dialog, the step driver, and
the non-interactive entry point used by tests (``LATENT_EDIT_KRITA_JOB=/path/job.json``)."""
from __future__ import annotations

import os
import sys
import threading
import traceback

import krita
from krita import Extension, Krita
from .qt import QTimer

from . import automation, model, settings

ACTION_ID = "latent_edit_dialog"
ACTION_TEXT = "Latent Edit…"
MENU = "filter"  # Krita 5.1.5: createAction's location is the menubar objectName path (krita-headless.md)
JOB_ENV = "LATENT_EDIT_KRITA_JOB"


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


def show_status(text: str, ms: int = 0) -> None:
    """Krita's status bar (the active main window's), if any."""
    win = Krita.instance().activeWindow()
    if win is not None and win.qwindow() is not None:
        win.qwindow().statusBar().showMessage(text, ms)


class LatentEditExtension(Extension):
    def __init__(self, parent):
        super().__init__(parent)
        self.cache = model.SessionCache()
        self.dialog = None
        self.running = None  # the EditRun in flight (one at a time)
        self.automation_request = None  # set by automation.py: run the action without the dialog

    def setup(self):
        path = os.environ.get(JOB_ENV)
        if path:
            self.job = automation.Automation(self, path)
            sys.excepthook = self.job.excepthook  # Krita's default hook opens a modal dialog: fatal headless
            notifier = Krita.instance().notifier()
            notifier.setActive(True)
            notifier.windowCreated.connect(lambda: QTimer.singleShot(200, self.job.start))

    def createActions(self, window):
        action = window.createAction(ACTION_ID, ACTION_TEXT, MENU)
        action.setToolTip("Semantic edits of a face (smile, age, pose…) as new layers, by the Latent Edit server")
        action.triggered.connect(self.on_action)

    # --- the action ---

    def on_action(self):
        request = self.automation_request
        if request is not None:
            self.automation_request = None
            self.apply(request["nodes"], request["options"], request.get("client"), request.get("on_finished"))
            return
        from .ui import LatentEditDialog  # Qt widgets only when a person opens the dialog

        if self.dialog is None:
            self.dialog = LatentEditDialog(self)
        self.dialog.show()
        self.dialog.raise_()
        self.dialog.activateWindow()
        self.dialog.refresh()

    def apply(self, nodes, options, client=None, on_finished=None, on_status=None):
        """Start one Apply on the active document; ``on_finished(added, error)`` when it ends."""
        app = Krita.instance()
        doc = app.activeDocument()
        if self.running is not None and not self.running.finished.is_set():
            if on_finished:
                on_finished(None, RuntimeError("a Latent Edit job is already running; wait for it or cancel it"))
            return
        if client is None:
            client = settings.load(app).client()

        def status(st):
            pct = int(round(st.progress * 100))
            show_status("Latent Edit: %s %d%%" % (st.message or st.stage or st.state, pct))
            if on_status:
                on_status(st)

        def set_run(run):
            self.running = run

        def done(added):
            show_status("Latent Edit: added %d layer group(s)" % len(added or []), 5000)
            if on_finished:
                on_finished(added, None)

        def failed(err):
            show_status("Latent Edit: %s" % err, 10000)
            if on_finished:
                on_finished(None, err)

        if doc is None:
            failed(RuntimeError("no document is open"))
            return
        gen = model.apply_steps(app, krita, doc, nodes, options, client, self.cache, on_status=status, on_run=set_run,
                                log=lambda m: print("latent-edit:", m, file=sys.stderr))
        drive(gen, done, failed)

    def cancel(self):
        if self.running is not None:
            self.running.cancel()
