"""Latent Edit engine: StyleGAN2 generator, inversion, tuning, segment inversion, edits, alignment.

The public API is re-exported here lazily, so importing ``core`` is cheap and a module is
only loaded when one of its names is first used.  Conventions used everywhere in ``core``:

* images are float32 tensors ``(N,3,H,W)`` in ``[-1,1]`` unless a docstring says otherwise;
* masks are float32 tensors ``(N,1,H,W)`` (or ``(H,W)``) in ``[0,1]``, 1 = "this pixel is ours";
* latents ``ws`` are ``(N, num_ws, w_dim)``;
* long-running functions take ``progress(event: core.common.ProgressEvent)`` and ``cancel``
  (a callable returning bool, or a ``threading.Event``) and raise :class:`core.common.Cancelled`.
"""
from __future__ import annotations

from core.common import lazy_exports

_EXPORTS = {
    # common
    "Cancelled": "core.common",
    "LatentEditError": "core.common",
    "InvalidInput": "core.common",
    "ProgressEvent": "core.common",
    # engine (issue 2)
    "Generator": "core.stylegan2.network",
    "GeneratorConfig": "core.stylegan2.network",
    "load_generator": "core.stylegan2.formats",
    "save_generator": "core.stylegan2.formats",
    "CheckpointError": "core.stylegan2.formats",
    # inversion and tuning (issue 3)
    "project": "core.projection",
    "project_w": "core.projection",
    "project_wplus": "core.projection",
    "pivotal_tune": "core.pti",
    "ProjectOptions": "core.projection",
    "PTIOptions": "core.pti",
    "LocalityOptions": "core.pti",
    "perceptual_loss": "core.losses",
    # segments (issue 4)
    "invert_segments": "core.chunks",
    "SegmentSession": "core.chunks",
    "Inversion": "core.inversion",
    "LayerGeometry": "core.geometry",
    # edits (issue 5)
    "Direction": "core.edits",
    "edit_inputs": "core.edits",
    "load_directions": "core.edits",
    "apply_edits": "core.edits",
    "sefa": "core.edits",
    "ganspace": "core.edits",
    "fit_interfacegan": "core.edits",
    "fit_attribute_directions": "core.edits",
    "save_manifest": "core.edits",
    "style_deltas_for": "core.edits",
    # real photos (issue 6)
    "Face": "core.align",
    "detect_faces": "core.align",
    "align_face": "core.align",
    "paste_back": "core.align",
    "find_face": "core.align",
    "AlignTransform": "core.align",
    # sessions and models (server-facing)
    "SessionOptions": "core.session",
    "create_session": "core.session",
    "EditSession": "core.session",
    "method_catalog": "core.session",
    "ModelRegistry": "core.models",
    # embedded default (issue 11)
    "default_model_path": "core.demo",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
