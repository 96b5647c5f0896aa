"""Test-only pykrita plugin: with ``LATENT_EDIT_KRITA_JOB=job.json`` it drives the installed Latent Edit
plugin (its one extension instance, ``latent_edit.EXTENSION``) through a job and quits. Installed only by
tests/hosts/krita_harness/run_krita.py, never by install.py."""
import os
import sys

from krita import Extension, Krita

JOB_ENV = "LATENT_EDIT_KRITA_JOB"


class TestDriver(Extension):
    def setup(self):
        path = os.environ.get(JOB_ENV)
        if not path:
            return
        import latent_edit  # the product plugin (loads it if Krita has not yet)
        from PyQt5.QtCore import QTimer

        from .automation import Automation

        self.job = Automation(latent_edit.EXTENSION, path)
        sys.excepthook = self.job.excepthook  # Krita's default hook opens a modal dialog: fatal headless
        notifier = Krita.instance().notifier()
        notifier.setActive(True)
        notifier.windowCreated.connect(lambda: QTimer.singleShot(200, self.job.start))

    def createActions(self, window):
        pass


Krita.instance().addExtension(TestDriver(Krita.instance()))
