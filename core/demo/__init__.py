"""The embedded default domain (design.md §6): procedural faces, their scorer, a small generator and directions.

``default_model_path()`` is the shipped generator (``weights/face64.pt``, loaded by ``core.load_generator``);
its directions manifest ``weights/face64.directions.json`` sits beside it.  ``render``, ``render_parts``,
``sample_params``, ``ATTRIBUTES``, ``PARTS``, ``ATTRIBUTE_PARTS`` (renderer), ``score`` (scorer) and ``segment``
(core.segmenter: part labels of images) are imported lazily.
"""
from __future__ import annotations

from core.common import lazy_exports
import pathlib

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"

_EXPORTS = {
    **{name: "core.demo.renderer" for name in ("render", "render_parts", "PARTS", "ATTRIBUTE_PARTS", "sample_params",
                                   "ATTRIBUTES", "EXTRAS")},
    "score": "core.demo.scorer",
    "load_scorer": "core.demo.scorer",
    "segment": "core.segmenter",  # images uint8 (N,H,W,3) -> (N,H,W) PARTS labels (the embedded segmenter)
}

__all__ = sorted([*_EXPORTS, "default_model_path", "default_directions_path", "default_encoder_path", "is_default_model",
                  "WEIGHTS_DIR"])


def default_model_path() -> pathlib.Path:
    """Path of the shipped 64 px demo generator (``core/demo/weights/face64.pt``)."""
    return WEIGHTS_DIR / "face64.pt"


def is_default_model(checkpoint) -> bool:
    """Whether ``checkpoint`` (a path) is the shipped generator — the one model with a ground truth (the renderer)."""
    try:
        return pathlib.Path(checkpoint).resolve() == default_model_path().resolve()
    except (OSError, TypeError):
        return False


def default_directions_path() -> pathlib.Path:
    """Path of the shipped directions manifest, beside the generator."""
    return WEIGHTS_DIR / "face64.directions.json"


def default_encoder_path() -> pathlib.Path:
    """Path of the shipped e4e-style encoder for the generator (``weights/encoder64.pt``, ``core.load_encoder``)."""
    return WEIGHTS_DIR / "encoder64.pt"


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)
