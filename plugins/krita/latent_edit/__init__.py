"""Latent Edit for Krita: Filter ▸ Latent Edit… edits a face through the local Latent Edit server and adds
the result as a new group with a masked paint layer above the source (which is never modified).

Modules: document (layer/selection access), layers (result insertion), model (options, worker thread,
session cache, the Apply flow), settings (kritarc), extension (action + driver), ui (dialog),
automation (non-interactive entry for tests). The shared stdlib client is ``common/`` (copied in at install).
"""
try:
    from krita import Krita
except ImportError:  # imported outside Krita (unit tests import the submodules directly)
    Krita = None

if Krita is not None and hasattr(Krita, "instance") and not getattr(Krita, "IS_FAKE", False):
    from .extension import LatentEditExtension

    Krita.instance().addExtension(LatentEditExtension(Krita.instance()))
