"""The latent code ↔ face-parameter map and the pre-rendered training cache.

The demo generator is trained by distillation: ``z ~ N(0, I_{z_dim})`` is normalised by its second
moment exactly as the StyleGAN2 mapping network does, and the first ``NUM_ATTRIBUTES`` normalised
coordinates go through the standard normal CDF to give renderer parameters in ``(0,1)``.  So
``G.mapping(randn)`` has one well-defined target face per ``z`` and its marginals are (close to)
the renderer's uniform prior.
"""
from __future__ import annotations

import importlib
import math
import pathlib
from types import ModuleType
from typing import Callable, Optional

import numpy as np

from core.common import InvalidInput
from core.demo.renderer import NUM_ATTRIBUTES

# The face renderers a generator can be distilled from, by the name a run and its caches record.  "v1" (issue
# 16's blob-drawn small features) was removed once the v2 model was installed; git history keeps it.
RENDERERS: dict[str, str] = {"v2": "core.demo.renderer"}


def renderer_module(name: str) -> ModuleType:
    """The renderer module named ``name`` (a key of ``RENDERERS``): it has ``render``, ``ATTRIBUTES``, ``EXTRAS``."""
    if name not in RENDERERS:
        raise InvalidInput(f"unknown renderer {name!r}; known: {', '.join(RENDERERS)}")
    return importlib.import_module(RENDERERS[name])


def normalize_2nd_moment(z: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """``z / sqrt(mean(z**2) + eps)`` over the last axis (StyleGAN2 mapping input normalisation)."""
    z = np.asarray(z, np.float64)
    return z / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + eps)


def params_from_z(z: np.ndarray) -> np.ndarray:
    """``(N, z_dim)`` latent codes -> ``(N, NUM_ATTRIBUTES)`` float32 renderer parameters in (0,1)."""
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[1] < NUM_ATTRIBUTES:
        raise InvalidInput(f"params_from_z: z must be (N, >= {NUM_ATTRIBUTES}), got {z.shape}")
    zn = normalize_2nd_moment(z)[:, :NUM_ATTRIBUTES]
    erf = np.vectorize(math.erf)
    return (0.5 * (1.0 + erf(zn / math.sqrt(2.0)))).astype(np.float32)


def build_cache(path: pathlib.Path, n: int, z_dim: int, seed: int,
                progress: Optional[Callable[[int, int], None]] = None, chunk: int = 500,
                renderer: str = "v2", size: int = 64) -> dict:
    """Render ``n`` faces for ``z = randn(n, z_dim)`` (seeded) with ``RENDERERS[renderer]`` into ``path``.

    Resumable: partial chunks are kept in ``path.with_suffix('.<renderer>.part')/`` and reused.  A finished cache
    of another renderer at ``path`` is an error (never silently mixed).  Returns the arrays
    ``{"z": (n,z_dim) f32, "params": (n,K) f32, "images": (n,size,size,3) u8}`` (the npz also holds ``renderer``).
    """
    path = pathlib.Path(path)
    mod = renderer_module(renderer)
    if path.exists():
        data = dict(np.load(path))
        made_by = str(data.pop("renderer", "v1"))  # caches written before v2 carry no name: v1 made them
        if made_by != renderer:
            raise InvalidInput(f"{path} was rendered by renderer {made_by!r}, not {renderer!r}: use another folder")
        if data["z"].shape == (n, z_dim) and data["images"].shape[1] == size:
            return data
    z = np.random.default_rng(seed).standard_normal((n, z_dim)).astype(np.float32)
    params = params_from_z(z)
    part = path.with_suffix(f".{renderer}.part")
    part.mkdir(parents=True, exist_ok=True)
    images = np.empty((n, size, size, 3), np.uint8)
    for start in range(0, n, chunk):
        f = part / f"{start:07d}.npy"
        stop = min(n, start + chunk)
        if f.exists() and np.load(f).shape[0] == stop - start:
            images[start:stop] = np.load(f)
        else:
            images[start:stop] = mod.render(params[start:stop], size=size)
            np.save(f, images[start:stop])
        if progress is not None:
            progress(stop, n)
    np.savez(path, z=z, params=params, images=images, renderer=np.array(renderer))
    for f in part.glob("*.npy"):
        f.unlink()
    part.rmdir()
    return {"z": z, "params": params, "images": images}
