"""Shared test fixtures: paths and tiny random generators (seconds, not minutes)."""
from __future__ import annotations

import pathlib

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
