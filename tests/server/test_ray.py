"""The Ray backend (server.ray_backend) on a real two-node Ray cluster on this machine.

A module-scoped cluster: ``ray start --head`` and a second node process (``ray start --address``), each with
``--num-cpus 1``.  The end-to-end server tests of test_api / test_jobs / test_restart run again here with the
``server`` / ``slow_server`` fixtures backed by Ray actors (the fake engine, built inside each actor), and a
node is killed mid-job.  Without Ray this module is skipped on a workstation and fails under ``CI=true``.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fake_engine import StepLog, make_engine
from server.ray_local import LocalCluster
from server_helpers import ROOT, LiveServer, collect_events, layer, make_image, tiny_models_dir, wait_job, wait_running
import test_restart

# The same end-to-end tests as the local backend, collected again here with this module's fixtures.
from test_api import (test_batch_one_job_several_sessions, test_delete_session_then_unknown,  # noqa: F401
                      test_float_layer_with_stride_padding, test_health_needs_no_token_and_reports,
                      test_locality_reaches_the_engine_from_the_protocol, test_long_poll_answers_at_the_next_change,
                      test_render_formats_json_and_reconstruction, test_session_with_selection_progress_and_two_renders)
from test_jobs import (test_cancel_queued_job_never_runs_and_queue_limit, test_cancel_running_job_within_one_step,  # noqa: F401
                       test_render_and_health_do_not_wait_for_running_job, test_retry_cancelled_job_same_id,
                       test_session_files_gone_answers_410, test_timeout_fails_job)

HAVE_RAY = importlib.util.find_spec("ray") is not None  # imported by the cluster, once its token is in os.environ

def _unavailable(why: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"the Ray tests must run under CI: {why} (python3 install.py --with ray)")
    pytest.skip(why)


class Cluster(LocalCluster):
    """Head + one more node, one CPU each, joined by this test process (it reads the node table)."""

    def __init__(self):
        super().__init__(nodes=2, cpus=1, pythonpath=[ROOT / "tests" / "server"])
        self.saved_env = {k: os.environ.get(k) for k in self.auth_env}
        os.environ.update(self.auth_env)  # this process and the servers it starts drive the cluster
        try:
            import ray

            self.ray = ray
            ray.init(address=self.address, namespace="latent-edit", configure_logging=False, log_to_driver=False)
            self.head_node = ray.get_runtime_context().get_node_id()
            deadline = time.monotonic() + 60
            while len(self.alive_nodes()) < 2:
                assert time.monotonic() < deadline, ray.nodes()
                time.sleep(0.2)  # polling the cluster's own node table (a condition with a deadline)
            self.worker_node = next(n for n in self.alive_nodes() if n != self.head_node)
        except BaseException:
            self.stop()
            raise

    def alive_nodes(self) -> list:
        return [n["NodeID"] for n in self.ray.nodes() if n["Alive"]]

    def kill_worker(self) -> None:
        self.kill_node(1)

    def stop(self) -> None:
        if getattr(self, "ray", None) is not None:
            self.ray.shutdown()
        super().stop()
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster():
    if not HAVE_RAY:
        _unavailable("ray is not installed")
    c = Cluster()
    yield c
    c.stop()


def ray_server(tmp_path: Path, cluster: Cluster, step_s: float, workers=None, **config) -> LiveServer:
    """A LiveServer whose engine is the Ray backend; each actor builds the fake engine, logging its steps to a
    file the test reads (``server.engine.step_log``, as with the local fake)."""
    from server.ray_backend import RayEngine, WorkerSpec

    log = StepLog(tmp_path / "steps.jsonl")
    spec = WorkerSpec(factory="fake_engine:make_engine",
                      factory_config={"fake_step_s": step_s, "fake_step_log": str(log.path)})
    engine = RayEngine(make_engine(step_s=step_s), spec, cluster.address, workers=workers)
    engine.step_log = log
    return LiveServer(tmp_path / "data", engine, **config)


@pytest.fixture
def server(tmp_path, cluster):  # test_api's fixture, on Ray: both nodes' workers
    srv = ray_server(tmp_path, cluster, 0.01, max_queue=4)
    yield srv
    srv.stop()


@pytest.fixture
def slow_server(tmp_path, cluster):  # test_jobs' fixture, on Ray: one worker, so "one running, three queued" holds
    srv = ray_server(tmp_path, cluster, 0.05, workers=1, max_queue=3)
    yield srv
    srv.stop()


def test_backend_ray_without_ray_installed_is_one_clear_error(tmp_path):
    stand_in = tmp_path / "no-ray" / "ray"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stand_in.parent), str(ROOT), str(ROOT / "tests" / "server")]))
    proc = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--data-dir", str(tmp_path / "d"),
                           "--backend", "ray", *test_restart.FAKE], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--backend ray needs the ray package" in proc.stderr and "install.py --with ray" in proc.stderr


def test_backend_ray_with_no_cluster_at_the_address_is_one_clear_error(tmp_path):
    import socket

    if not HAVE_RAY:
        _unavailable("ray is not installed")
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "server")]))
    proc = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--data-dir", str(tmp_path / "d"),
                           "--backend", "ray", "--ray-address", f"127.0.0.1:{port}", *test_restart.FAKE], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in proc.stderr


def test_jobs_spread_over_both_nodes_and_renders_go_to_the_holder(tmp_path, cluster):
    srv = ray_server(tmp_path, cluster, 0.02)
    try:
        from server.app import RENDERER

        assert srv.engine.parallel_jobs == 2  # one worker per CPU of the cluster
        assert srv.engine.pool.wait_ready(120) == 2
        jobs = [srv.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16, seed=i)),
                                                      "options": {"project_steps": 10}}).body for i in range(2)]
        assert all(wait_job(srv, j["job_id"])["state"] == "done" for j in jobs)
        nodes = {srv.app[RENDERER].live.get(j["session_id"]).node_id for j in jobs}
        assert nodes == {cluster.head_node, cluster.worker_node}  # two at once: one per worker, one per node
        assert srv.request("POST", f"/v1/sessions/{jobs[0]['session_id']}/render", {"edits": []}).status == 200
    finally:
        srv.stop()


def test_workers_that_cannot_start_fail_the_job_with_their_reason(tmp_path, cluster):
    """An engine the workers cannot build (here: a factory module missing on the nodes) is a failed job that
    says why, not a job waiting forever."""
    from server.ray_backend import RayEngine, WorkerSpec

    engine = RayEngine(make_engine(step_s=0.01), WorkerSpec(factory="no_such_module_on_the_nodes:make"),
                       cluster.address, workers=1, wait_s=30)
    srv = LiveServer(tmp_path / "data", engine)
    try:
        r = srv.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16)), "options": {"project_steps": 2}})
        job = wait_job(srv, r.body["job_id"], timeout=90)
        assert job["state"] == "failed" and job["error"]["error"] == "worker_lost", job
        assert "no_such_module_on_the_nodes" in job["error"]["message"]
    finally:
        srv.stop()


def test_real_engine_session_on_ray_and_reloaded_from_storage(tmp_path, cluster):
    """The real core engine in a worker (tiny random generator): PTI with progress, a render on the actor that
    tuned it, then the same render after the session is loaded again from the server's saved files."""
    from server.app import RENDERER
    from server.engine import Engine
    from server.ray_backend import RayEngine, WorkerSpec

    models_dir = tiny_models_dir(tmp_path)
    engine = RayEngine(Engine.from_core(models_dir, "cpu"), WorkerSpec(models_dir=str(models_dir)), cluster.address,
                       workers=1)
    srv = LiveServer(tmp_path / "data", engine)
    try:
        model = next(m for m in srv.request("GET", "/v1/models").body["models"] if m["name"] == "tiny32")
        img = make_image(32, 32)
        r = srv.request("POST", "/v1/sessions", {"layer": layer(img), "model": "tiny32", "method": "pti", "align": "none",
                                                 "options": {"project_steps": 4, "tune_steps": 2}})
        assert r.status == 202, r.body
        events = asyncio.run(collect_events(srv.port, srv.token, r.body["job_id"], timeout=240))
        assert events[-1]["state"] == "done", events[-1]
        assert any(0 < e["progress"] < 1 for e in events)  # progress came back from the worker
        sid, edit = r.body["session_id"], {"direction": model["directions"][0]["name"], "strength": 2.0}
        first = srv.request("POST", f"/v1/sessions/{sid}/render", {"edits": [edit]})
        assert first.status == 200, first.body
        srv.app[RENDERER].live.drop(sid)  # forgotten: the next render loads the saved files onto a worker
        again = srv.request("POST", f"/v1/sessions/{sid}/render", {"edits": [edit]})
        assert again.status == 200 and again.body["layer"]["data"] == first.body["layer"]["data"]
        assert srv.request("GET", "/v1/health", token=None).body["perceptual_backbone"] not in ("loading", "none")
    finally:
        srv.stop()


def test_restart_on_ray(tmp_path, cluster, monkeypatch):
    """test_restart's SIGKILL-and-restart, with `python -m server --backend ray` (one worker, so a job queues)."""
    monkeypatch.setattr(test_restart, "FAKE", test_restart.FAKE + ["--backend", "ray", "--ray-address", cluster.address,
                                                                   "--ray-workers", "1"])
    test_restart.test_sigkill_mid_job_then_restart(tmp_path)


def render_bytes(srv, sid: str) -> bytes:
    r = srv.request("POST", f"/v1/sessions/{sid}/render", {"edits": [{"direction": "smile", "strength": 1}]})
    assert r.status == 200, r.body
    return r.body["layer"]["data"]


def test_node_killed_mid_job(tmp_path, cluster):
    """Last in this module (the cluster keeps one node after it).  A node dies while both workers run a job:
    the finished sessions on it reload on the other node and render as before, the interrupted job re-runs
    there and finishes, nothing is left running."""
    from server.app import RENDERER

    srv = ray_server(tmp_path, cluster, 0.05)
    try:
        live = srv.app[RENDERER].live
        assert srv.engine.pool.wait_ready(120) == 2
        quick = [srv.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16, seed=i)),
                                                       "options": {"project_steps": 4}}).body for i in range(2)]
        assert all(wait_job(srv, j["job_id"])["state"] == "done" for j in quick)
        on_worker = [j for j in quick if live.get(j["session_id"]).node_id == cluster.worker_node]
        assert len(on_worker) == 1
        before = {j["session_id"]: render_bytes(srv, j["session_id"]) for j in quick}

        long = [srv.request("POST", "/v1/sessions", {"layer": layer(make_image(16, 16, seed=10 + i)),
                                                      "options": {"project_steps": 60}}).body for i in range(2)]
        for j in long:
            wait_running(srv, j["job_id"])
        cluster.kill_worker()

        finals = [wait_job(srv, j["job_id"], timeout=120) for j in long]
        assert [f["state"] for f in finals] == ["done", "done"], finals  # one of them ran again on the head node
        assert srv.engine.retried_jobs == 1 and srv.engine.pool.lost_count == 1
        health = srv.request("GET", "/v1/health", token=None).body
        assert health["queue"]["running"] == 0 and health["queue"]["queued"] == 0  # nothing stuck
        for j in quick + long:  # every finished result is still there, on the surviving node
            assert srv.request("GET", f"/v1/sessions/{j['session_id']}").body["state"] == "ready"
        for sid, data in before.items():
            assert render_bytes(srv, sid) == data
            assert live.get(sid).node_id == cluster.head_node
        out = np.frombuffer(render_bytes(srv, long[0]["session_id"]), np.uint8)
        assert out.size == 16 * 16 * 4
    finally:
        srv.stop()


def test_install_with_ray_installs_and_checks_the_optional_package(tmp_path, monkeypatch, capsys):
    """install.py --with ray: --check names the missing package, install pip-installs it, then nothing is missing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("install_for_ray_test", ROOT / "install.py")
    install = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "install_for_ray_test", install)
    spec.loader.exec_module(install)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    marker = tmp_path / "pip-installed"
    fake_python = venv / "bin" / "python"  # stands in for the venv's python: `import ray` works once pip ran
    fake_python.write_text(f"#!/bin/sh\ncase \"$*\" in\n  *'-m pip install'*) echo \"$*\" > '{marker}' ;;\n"
                           f"  *'import ray'*) test -f '{marker}' ;;\nesac\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(install.Installer, "venv_missing", lambda self: [])
    inst = install.Installer(venv=venv, plugins=False, data_dir=tmp_path / "data", weights=[], extras=["ray"])
    assert inst.check() == 1 and "optional package ray" in capsys.readouterr().out
    assert inst.install() == 0
    assert "ray==" in marker.read_text()
    assert inst.check() == 0
    assert install.parse_args(["--with", "ray"]).extras == ["ray"]
