"""Shared fixtures for host tests (real Krita under Xvfb, real GIMP 3): the host-availability rule and a
real Latent Edit server on a free loopback port.

Availability rule: when a host cannot run here, the test FAILS under CI (``CI=true``) with the reason, and
is skipped with the reason otherwise — a skip is never counted as a pass in CI.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.launch import stop_process, wait_for_ready

ROOT = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT_S = 180.0  # the first start may build caches and load the model on a busy 2-core machine


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def host_unavailable(reason: str):
    """Fail under CI, skip otherwise; always with ``reason``."""
    if in_ci():
        pytest.fail("host test cannot run in CI: " + reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="host_unavailable", scope="session")
def host_unavailable_fixture():
    """The availability rule as a fixture: ``host_unavailable("krita is not installed")``."""
    return host_unavailable


@dataclass
class RunningServer:
    url: str
    token_file: Path
    data_dir: Path
    model: str
    model_info: dict
    log_path: Path
    proc: subprocess.Popen = field(repr=False)

    def directions(self) -> list:
        return [d["name"] if isinstance(d, dict) else str(d) for d in self.model_info.get("directions") or []]

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


def _prepare_models(models_dir: Path) -> None:
    """Without the embedded default (core/demo weights), put a tiny random generator in the models folder."""
    try:
        from core.demo import default_model_path

        if Path(default_model_path()).is_file():
            return
    except Exception:  # noqa: BLE001 - no embedded model yet: fall back to the tiny one
        pass
    import importlib.util

    spec = importlib.util.spec_from_file_location("_root_conftest", ROOT / "tests" / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)  # tests/conftest.py: the shared tiny generator
    spec.loader.exec_module(root_conftest)
    from core.stylegan2.formats import save_generator

    make_tiny_generator = root_conftest.make_tiny_generator

    save_generator(make_tiny_generator(resolution=64, w_dim=32, seed=0), str(models_dir / "tiny64.pt"))


def start_server(data_dir: Path, host: str = "127.0.0.1", extra_args=()) -> RunningServer:
    """``python -m server --port 0`` and wait for its ready line (which carries the chosen port)."""
    models_dir = data_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    _prepare_models(models_dir)
    log_path = data_dir / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "server", "--host", host, "--port", "0", "--data-dir", str(data_dir),
           "--models-dir", str(models_dir), "--device", "cpu", *extra_args]
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=open(log_path, "wb"), text=True)
    url = wait_for_ready(proc, SERVER_START_TIMEOUT_S)
    if url is None:
        proc.kill()
        proc.wait(10)
        raise RuntimeError("the server did not become ready (rc=%s); log:\n%s"
                           % (proc.returncode, log_path.read_text(errors="replace")[-4000:]))
    sys.path.insert(0, str(ROOT))
    from plugins.common.client import Client

    client = Client(url, token_file=str(data_dir / "token"), timeout=30)
    health = client.health()
    models = client.models()
    name = health.get("default_model") or (models[0]["name"] if models else None)
    info = next((m for m in models if m.get("name") == name), {})
    return RunningServer(url, data_dir / "token", data_dir, name, info, log_path, proc)


def stop_server(server: RunningServer) -> None:
    stop_process(server.proc, 20, kill_timeout=10)


@pytest.fixture(scope="module")
def latent_server(tmp_path_factory):
    """A real server (real engine) on 127.0.0.1 with the embedded default model, or a tiny random one."""
    data_dir = tmp_path_factory.mktemp("server")
    server = start_server(data_dir)
    try:
        yield server
    finally:
        stop_server(server)
        shutil.rmtree(data_dir / "sessions", ignore_errors=True)
