"""``python -m server`` as a real process: token file, ready line, SIGKILL mid-job, restart, interrupted jobs."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np

from server_helpers import ROOT, ServerProcess, box_selection, layer, make_image, wait_job, wait_running

FAKE = ["--engine", "fake_engine:make_engine", "--device", "cpu"]  # cpu: no torch import


def test_sigkill_mid_job_then_restart(tmp_path):
    data = tmp_path / "data"
    img, sel = make_image(24, 24), box_selection(24, 24)
    srv = ServerProcess(data, FAKE, env={"FAKE_STEP_S": "0.05"})
    try:
        token_file = data / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert srv.request("GET", "/v1/models", token=None).status == 401
        body = {"layer": layer(img), "selection": layer(sel[..., None], "gray8"), "options": {"project_steps": 2}}
        done = srv.request("POST", "/v1/sessions", body).body
        assert wait_job(srv, done["job_id"])["state"] == "done"
        before = srv.request("POST", f"/v1/sessions/{done['session_id']}/render",
                             {"edits": [{"direction": "smile", "strength": 1}]})
        assert before.status == 200
        running = srv.request("POST", "/v1/sessions", dict(body, options={"project_steps": 2000})).body
        wait_running(srv, running["job_id"])
        queued = srv.request("POST", "/v1/sessions", dict(body, options={"project_steps": 2})).body
        assert srv.request("GET", f"/v1/jobs/{queued['job_id']}").body["state"] == "queued"
        srv.kill()
    finally:
        srv.stop()

    orphan = data / "jobs" / "f00dfeed"  # as if killed between saving inputs and recording the job
    orphan.mkdir()
    (orphan / "item0.layer.npy").write_bytes(b"partial")
    srv = ServerProcess(data, FAKE, env={"FAKE_STEP_S": "0.01"})
    try:
        assert srv.token == token_file.read_text().strip()  # the token survives restarts
        assert not orphan.exists()
        for job in (running, queued):
            r = srv.request("GET", f"/v1/jobs/{job['job_id']}")
            assert r.status == 200 and r.body["state"] == "interrupted", r.body
        r = srv.request("POST", f"/v1/sessions/{running['session_id']}/render", {"edits": []})
        assert r.status == 409 and r.body["error"] == "session_interrupted"
        # the finished session renders exactly as before the crash
        after = srv.request("POST", f"/v1/sessions/{done['session_id']}/render",
                            {"edits": [{"direction": "smile", "strength": 1}]})
        assert after.status == 200 and after.body["layer"]["data"] == before.body["layer"]["data"]
        out = np.frombuffer(after.body["layer"]["data"], np.uint8).reshape(24, 24, 4)
        assert np.array_equal(out[sel == 0][:, :3], img[sel == 0][:, :3]) and (out[sel == 0][:, 3] == 0).all()
        # nothing submitted was lost: the interrupted job re-runs from its saved inputs
        r = srv.request("POST", f"/v1/jobs/{queued['job_id']}/retry")
        assert r.status == 202
        assert wait_job(srv, queued["job_id"])["state"] == "done"
        assert srv.request("POST", f"/v1/sessions/{queued['session_id']}/render", {"edits": []}).status == 200
        assert srv.request("GET", "/v1/health", token=None).body["queue"]["queued"] == 0
    finally:
        assert srv.stop() == 0  # SIGTERM: clean shutdown


def test_token_file_option(tmp_path):
    tf = tmp_path / "secret" / "tok"
    tf.parent.mkdir()
    tf.write_text("a-token-chosen-by-the-user-1234\n")
    os.chmod(tf, 0o644)
    srv = ServerProcess(tmp_path / "data", FAKE + ["--token-file", str(tf)])
    try:
        assert srv.request("GET", "/v1/models", token="a-token-chosen-by-the-user-1234").status == 200
        assert stat.S_IMODE(tf.stat().st_mode) == 0o600  # tightened
        assert not (tmp_path / "data" / "token").exists()
    finally:
        srv.stop()


def test_second_server_on_same_data_dir_refused(tmp_path):
    srv = ServerProcess(tmp_path / "data", FAKE)
    try:
        proc = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--data-dir", str(tmp_path / "data"),
                               *FAKE], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "server")])))
        assert proc.returncode != 0 and "another server is already using" in proc.stderr
        assert srv.request("GET", "/v1/health", token=None).status == 200
    finally:
        assert srv.stop() == 0


def test_cli_rejects_bad_arguments(tmp_path):
    for extra in (["--port", "99999"], ["--models-dir", str(tmp_path / "missing")], ["--device", "tpu"]):
        proc = subprocess.run([sys.executable, "-m", "server", "--data-dir", str(tmp_path / "d"), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "error" in proc.stderr.lower(), (extra, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr
