"""The Krita extension: the "Latent Edit…" action in the Filter menu, the dialog, and ``apply`` — one
Apply on the active document, shared by the dialog and scripts."""
from __future__ import annotations

import sys

import krita
from krita import Extension, Krita

from . import model, settings
from .qt import drive

ACTION_ID = "latent_edit_dialog"
ACTION_TEXT = "Latent Edit…"
MENU = "filter"  # Krita 5.1.5: createAction's location is the menubar objectName path (krita-headless.md)


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

    def setup(self):
        pass

    def createActions(self, window):
        action = window.createAction(ACTION_ID, ACTION_TEXT, MENU)
        action.setToolTip("Semantic edits of a face (smile, age, pose…) as new layers, by the Latent Edit server")
        action.triggered.connect(self.open_dialog)

    def open_dialog(self):
        from .ui import LatentEditDialog  # Qt widgets only when a person opens the dialog

        if self.dialog is None:
            self.dialog = LatentEditDialog(self)
        self.dialog.open_beside_canvas()

    def busy(self) -> bool:
        return self.running is not None and not self.running.finished.is_set()

    def apply(self, nodes, options, client=None, on_finished=None, on_status=None, preview=None):
        """Start one Apply on the active document; ``on_finished(added, error)`` when it ends."""
        app = Krita.instance()
        doc = app.activeDocument()
        if self.busy():
            if on_finished:
                on_finished(None, RuntimeError("A Latent Edit job is already running. Wait for it or cancel it."))
            return
        if client is None:
            client = settings.load(app).client()

        def status(st):
            show_status("Latent Edit: %s (%d%%)" % (st.message, int(round(st.progress * 100))))
            if on_status:
                on_status(st)

        def set_run(run):
            self.running = run

        def done(added):
            show_status("Latent Edit: added %s" % ", ".join(g.name() for g, _l, _m in added or []), 5000)
            if on_finished:
                on_finished(added, None)

        def failed(err):
            show_status("Latent Edit: %s" % err, 10000)
            if on_finished:
                on_finished(None, err)

        if doc is None:
            failed(RuntimeError("No document is open."))
            return
        self.running = None
        gen = model.apply_steps(app, krita, doc, nodes, options, client, self.cache, on_status=status, on_run=set_run,
                                log=lambda m: print("latent-edit:", m, file=sys.stderr), preview=preview)
        drive(gen, done, failed)

    def cancel(self):
        if self.running is not None:
            self.running.cancel()
