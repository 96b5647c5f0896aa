"""Shared test fixtures: paths and tiny random generators (seconds, not minutes).

Test modules import the helpers as ``from tests.conftest import ...`` (a bare ``import conftest`` can resolve
to tests/hosts/conftest.py in a full run). The fixtures below are visible to every test; a module that needs a
different ``G`` (a real checkpoint, another seed) defines its own, which takes precedence.
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


def make_tiny_generator(resolution: int = 32, w_dim: int = 32, seed: int = 0):
    """A random StyleGAN2 with small channel counts; deterministic for a given seed."""
    from core.stylegan2.network import Generator, GeneratorConfig

    torch.manual_seed(seed)
    channels = {4: 32, 8: 32, 16: 32, 32: 16, 64: 16, 128: 8}
    cfg = GeneratorConfig(
        resolution=resolution,
        z_dim=w_dim,
        w_dim=w_dim,
        mapping_layers=2,
        channels={r: c for r, c in channels.items() if r <= resolution},
    )
    return Generator(cfg).eval()


@pytest.fixture
def tiny_generator():
    return make_tiny_generator()


@pytest.fixture(scope="module")
def G():
    """The default tiny generator, built once per test module."""
    return make_tiny_generator()


def layer(size: int, seed: int = 0, soft_rows: int = 0) -> np.ndarray:
    """A (size,size,4) float32 RGBA test layer: smooth gradients plus seeded noise, opaque except its first
    ``soft_rows`` rows, which are at alpha 0.5."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([xx, yy, 0.5 + 0.3 * np.sin(8 * xx)], -1) * 0.7 + 0.3 * rng.random((size, size, 3))
    alpha = np.ones((size, size, 1))
    alpha[:soft_rows] = 0.5
    return np.concatenate([rgb, alpha], -1).astype(np.float32)


def fast_chunks_options():
    """``core.chunks.ChunksOptions`` for tests: L2 only, a small w_avg estimate (seconds on 2 cores). A fresh
    instance per call, so modules never share one mutable options object."""
    from core.chunks import ChunksOptions

    return ChunksOptions(lpips_weight=0.0, l2_weight=1.0, w_avg_samples=200)


def auto_segments_session(G, segmenter, steps: int = 2):
    """``(session, layer, selection)``: a chunks session with ``segments="auto"`` from ``segmenter`` on a random 32 px
    layer with a rectangular selection; checks what every segment source must hold: each segment's mask lies
    inside the selection and the masks sum to one there."""
    from core.session import MethodAssets, SessionOptions, create_session

    rng = np.random.default_rng(0)
    img = np.concatenate([rng.random((32, 32, 3)), np.ones((32, 32, 1))], -1).astype(np.float32)
    sel = np.zeros((32, 32), np.float32)
    sel[4:28, 6:30] = 1
    sess = create_session(G, img, sel, SessionOptions(method="chunks", align="none", project_steps=steps,
                                                      segments="auto"), assets=MethodAssets(segmenter=segmenter))
    m = sess.segment_masks
    assert m.shape == (sess.inversion.segments, 32, 32) and np.all(m[:, sel == 0] == 0)
    assert np.allclose(m.sum(0)[sel > 0], 1, atol=1e-5)
    return sess, img, sel
