"""Shared pieces of the host tests: the real server on loopback, face test images, and the rule that a host
that cannot run is a clear skip locally but a failure under CI=true (a skip never counts as a pass there)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
READY = "latent-edit server ready at "


def host_unavailable(reason: str):
    """Skip with ``reason``, or fail under CI (where the hosts must run)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"host test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def face_rgba8(size: int, seed: int) -> bytes:
    """An opaque face of the embedded default domain, ``size``×``size`` RGBA8 (nearest-upscaled from 64 px)."""
    from core import demo

    params = demo.sample_params(1, seed)
    rgb = np.asarray(demo.render(params[0]), dtype=np.uint8)
    if rgb.ndim == 4:
        rgb = rgb[0]
    reps = size // rgb.shape[0]
    rgb = rgb.repeat(reps, axis=0).repeat(reps, axis=1)
    alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    return np.concatenate([rgb, alpha], axis=2).tobytes()


@dataclass
class LiveServer:
    url: str
    token_file: Path
    data_dir: Path
    process: subprocess.Popen


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``python -m server`` on a free loopback port with the embedded default model."""
    data_dir = tmp_path_factory.mktemp("server-data")
    log = open(data_dir / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0",
                             "--data-dir", str(data_dir), "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    url = None
    for line in proc.stdout:  # the server prints the ready line once it listens
        if line.startswith(READY):
            url = line[len(READY):].strip().rstrip("/")
            break
    if url is None:
        proc.wait(timeout=30)
        pytest.fail(f"the server did not start (exit {proc.returncode}); see {data_dir / 'server.log'}")
    yield LiveServer(url, data_dir / "token", data_dir, proc)
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
