"""Edit directions: ``directions`` (the :class:`Direction` type and applying edits to codes), ``formats``
(every common file format and our manifest) and ``fitting`` (SeFa, GANSpace, InterfaceGAN from a generator).

Every public name is re-exported here, so ``from core.edits import X`` works for all of them;
``python -m core.edits PATH`` lists the directions a file provides (``core/edits/__main__.py``).
"""
from __future__ import annotations

from core.edits.directions import (DEFAULT_RANGE, Direction, DirectionError, apply_edits, edit_inputs, s_direction,
                                   style_deltas_for)
from core.edits.fitting import (InterfaceGANOptions, condition, fit_attribute_directions, fit_interfacegan,
                                ganspace, latent_sample_digest, s_in_std_units, sample_w, sefa, style_std)
from core.edits.formats import (MANIFEST_FORMAT, MANIFEST_SUFFIX, MANIFEST_VERSION, PTI_GANSPACE_PRESETS,
                                load_directions, main, manifest_path_for, read_ganspace, read_manifest, read_vector,
                                save_manifest, validate)

__all__ = [
    "DEFAULT_RANGE", "Direction", "DirectionError", "apply_edits", "edit_inputs", "s_direction", "style_deltas_for",
    "InterfaceGANOptions", "condition", "fit_attribute_directions", "fit_interfacegan", "ganspace",
    "latent_sample_digest", "s_in_std_units", "sample_w", "sefa", "style_std",
    "MANIFEST_FORMAT", "MANIFEST_SUFFIX", "MANIFEST_VERSION", "PTI_GANSPACE_PRESETS", "load_directions",
    "main", "manifest_path_for", "read_ganspace", "read_manifest", "read_vector", "save_manifest", "validate",
]
