"""Latent Edit for Krita: Filter ▸ Latent Edit… edits a face through the local Latent Edit server and adds
the result as a new group with a masked paint layer above the source (which is never modified).

Modules: document (layer/selection access), layers (result insertion, live preview layer), model (worker
thread and the Apply steps over the shared ``common/flow.py``), settings (kritarc), qt (bindings and event
loop helpers), extension (the action), ui (the dialog), widgets (its edit rows). ``common/`` is
``plugins/common``, copied in at install.
"""
try:
    import krita
except ImportError:  # imported outside Krita: unit tests import the submodules directly
    krita = None

if krita is not None:
    from .extension import LatentEditExtension

    EXTENSION = LatentEditExtension(krita.Krita.instance())  # the one instance (scripts reach it here)
    krita.Krita.instance().addExtension(EXTENSION)
