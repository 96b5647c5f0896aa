"""Scale-out of the server over Ray workers: jobs/min and render latency, local backend vs 1 and 2 Ray workers.

Every configuration is a real ``python -m server`` (the embedded model, the real engine) driven over HTTP, in
one run on one machine: the local backend (in-process, one job at a time, 1 torch thread), then the Ray
backend on a two-node local cluster (``server.ray_local.LocalCluster``, one CPU per node, workers of 1 torch
thread) with 1 and with 2 workers, then 2 workers with the second node SIGKILLed while both run a job.

Per configuration: N independent PTI jobs (held-out faces from ``core.demo``'s renderer, seed 2323: never
a training or tuning input) are submitted at once; ``jobs_per_min`` = N / (last job's end − first job's
creation, server clock); then every session is rendered ``--renders`` times with random edits through
``POST /v1/sessions/{id}/render`` (client wall time: ``render_p50_ms`` / ``render_p95_ms``).  The kill run
reports ``lost_jobs`` (submitted jobs that did not end ``done``) and ``lost_results`` (sessions finished
before the kill that no longer render identically).
``speedup_vs_ray1`` compares with the one-worker Ray row of the same run.

    python bench/scaleout.py [--quick] [--json PATH]
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

from _util import ROOT, parse_args, print_table, write_json

from server.launch import port_of, stop_process, wait_for_ready

FACE_SEED = 2323  # held-out faces: the training caches use seeds 0 and 1, bench/editability default_rng(1616)
TERMINAL = {"done", "failed", "cancelled", "interrupted"}


class Server:
    """``python -m server`` with ``extra`` flags on a free port, its own data folder, 1 torch thread."""

    def __init__(self, extra: list, env: dict, timeout: float = 300):
        self.data = Path(tempfile.mkdtemp(prefix="le-scaleout-"))
        self.log = open(self.data / "server.log", "w")
        cmd = [sys.executable, "-m", "server", "--port", "0", "--data-dir", str(self.data / "d"), "--max-queue", "64",
               "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
        url = wait_for_ready(self.proc, timeout)
        if not url:
            self.stop()
            raise RuntimeError(f"server did not start: {(self.data / 'server.log').read_text()[-3000:]}")
        self.port = port_of(url)
        self.token = (self.data / "d" / "token").read_text().strip()

    def request(self, method: str, path: str, body=None, timeout: float = 120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/msgpack"}
            data = None
            if body is not None:
                data, headers["Content-Type"] = msgpack.packb(body, use_bin_type=True), "application/msgpack"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, msgpack.unpackb(resp.read(), raw=False)
        finally:
            conn.close()

    def wait_warm(self, timeout: float = 600) -> None:
        """Until the engine has warmed up (model + perceptual backbone loaded; on Ray: on the workers)."""
        deadline = time.monotonic() + timeout
        while self.request("GET", "/v1/health")[1]["perceptual_backbone"] == "loading":
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not warm up")
            time.sleep(0.5)  # health has no long poll; bounded by the deadline

    def wait_job(self, job_id: str, timeout: float = 1800) -> dict:
        deadline, version = time.monotonic() + timeout, -1
        while time.monotonic() < deadline:
            _, job = self.request("GET", f"/v1/jobs/{job_id}?after={version}&wait=20")
            if job["state"] in TERMINAL:
                return job
            version = job["version"]
        return job

    def stop(self) -> None:
        stop_process(self.proc, 60, kill_timeout=30)
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)


def faces(n: int) -> list:
    from core.demo import render, sample_params

    out = []
    for p in sample_params(n, seed=FACE_SEED):
        rgb = render(p, size=64)
        out.append(np.concatenate([rgb, np.full((64, 64, 1), 255, np.uint8)], axis=2))
    return out


def wire(img: np.ndarray) -> dict:
    return {"width": img.shape[1], "height": img.shape[0], "format": "rgba8", "stride": img.shape[1] * 4,
            "data": np.ascontiguousarray(img).tobytes()}


def submit(srv: Server, imgs: list, steps: dict) -> list:
    jobs = []
    for img in imgs:
        status, body = srv.request("POST", "/v1/sessions", {"layer": wire(img), "method": "pti", "align": "none",
                                                            "options": steps})
        if status != 202:
            raise RuntimeError(f"submit refused: {status} {body}")
        jobs.append(body)
    return jobs


def render_times(srv: Server, sids: list, directions: list, repeats: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    times = []
    for _ in range(repeats):
        for sid in sids:
            edits = [{"direction": str(d), "strength": float(rng.uniform(-3, 3))}
                     for d in rng.choice(directions, size=2, replace=False)]
            t0 = time.perf_counter()
            status, body = srv.request("POST", f"/v1/sessions/{sid}/render", {"edits": edits})
            times.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise RuntimeError(f"render failed: {status} {body}")
    return times


def reference_render(srv: Server, sid: str, direction: str) -> bytes:
    status, body = srv.request("POST", f"/v1/sessions/{sid}/render", {"edits": [{"direction": direction, "strength": 2.0}]})
    return body["layer"]["data"] if status == 200 else b""


def measure(label: str, backend: str, workers: int, extra: list, env: dict, imgs: list, steps: dict, renders: int,
            kill=None) -> dict:
    """One configuration: start its server, warm it, run the jobs (``kill(srv, jobs)`` once both workers run,
    for the kill row), render, stop it."""
    srv = Server(extra, env)
    try:
        srv.wait_warm()
        model = srv.request("GET", "/v1/models")[1]
        directions = [d["name"] for d in next(m for m in model["models"] if m["name"] == model["default_model"])["directions"]]
        before = {}
        if kill is not None:  # results that exist before the node dies must survive it
            early = submit(srv, imgs[:2], steps)
            for j in early:
                srv.wait_job(j["job_id"])
            before = {j["session_id"]: reference_render(srv, j["session_id"], directions[0]) for j in early}
        jobs = submit(srv, imgs, steps)
        if kill is not None:
            kill(srv, jobs)
        finals = [srv.wait_job(j["job_id"]) for j in jobs]
        done = [f for f in finals if f["state"] == "done"]
        created = min(f["created"] for f in finals)
        ended = max(f["finished"] or time.time() for f in finals)
        lost_results = sum(1 for sid, data in before.items() if reference_render(srv, sid, directions[0]) != data)
        times = render_times(srv, [f["session_ids"][0] for f in done], directions, renders)
        return {"config": label, "backend": backend, "workers": workers, "threads_per_worker": 1, "jobs": len(jobs),
                "jobs_per_min": round(len(done) / max(ended - created, 1e-9) * 60, 2),
                "job_s_mean": round(float(np.mean([f["finished"] - f["started"] for f in done])) if done else float("nan"), 2),
                "render_p50_ms": round(float(np.percentile(times, 50)), 1) if times else float("nan"),
                "render_p95_ms": round(float(np.percentile(times, 95)), 1) if times else float("nan"),
                "lost_jobs": len(jobs) - len(done), "lost_results": lost_results if kill is not None else 0,
                "worker_killed": kill is not None, "states": ",".join(sorted({f["state"] for f in finals}))}
    finally:
        srv.stop()


def main():
    args = parse_args(__doc__.splitlines()[0], extra=lambda p: (
        p.add_argument("--jobs", type=int, default=None, help="PTI jobs per configuration (default 8; quick 6)"),
        p.add_argument("--renders", type=int, default=None, help="renders per session (default 10; quick 5)")))
    n = args.jobs or (6 if args.quick else 8)
    renders = args.renders or (5 if args.quick else 10)
    # quick: short PTI (20 projection + 15 tuning steps: ~12 s a job on one thread of a loaded 2-core machine) so
    # the run stays under ~10 min; the full run: 60 + 40 steps, 8 jobs
    steps = {"project_steps": 20, "tune_steps": 15} if args.quick else {"project_steps": 60, "tune_steps": 40}
    imgs = faces(n)
    env = dict(os.environ)
    rows = [measure("local", "local", 1, [], env, imgs, steps, renders)]
    from server.ray_local import LocalCluster

    cluster = LocalCluster(nodes=2, cpus=1)
    env = dict(env, **cluster.auth_env)  # the servers drive the cluster with its token
    try:
        ray = ["--backend", "ray", "--ray-address", cluster.address, "--ray-threads", "1"]
        rows.append(measure("ray 1 worker", "ray", 1, ray + ["--ray-workers", "1"], env, imgs, steps, renders))
        rows.append(measure("ray 2 workers", "ray", 2, ray + ["--ray-workers", "2"], env, imgs, steps, renders))

        def kill(srv, jobs):  # once both workers are past their first step, the second node dies
            running = set()
            deadline = time.monotonic() + 600
            while len(running) < 2 and time.monotonic() < deadline:
                for j in jobs:
                    job = srv.request("GET", f"/v1/jobs/{j['job_id']}")[1]
                    if job["state"] == "running" and job["progress"] > 0:
                        running.add(j["job_id"])
                time.sleep(0.2)  # polling job states; bounded by the deadline
            cluster.kill_node(1)

        rows.append(measure("ray 2 workers, node killed", "ray", 2, ray + ["--ray-workers", "2"], env,
                            imgs[:max(2, n * 2 // 3)], steps, renders, kill=kill))  # fewer jobs: keeps --quick short
    finally:
        cluster.stop()
    base = next(r for r in rows if r["config"] == "ray 1 worker")["jobs_per_min"]
    local = rows[0]["jobs_per_min"]
    for r in rows:
        r["speedup_vs_ray1"] = round(r["jobs_per_min"] / base, 2) if base else float("nan")
        r["speedup_vs_local"] = round(r["jobs_per_min"] / local, 2) if local else float("nan")
    print_table(rows, ["config", "backend", "workers", "jobs", "jobs_per_min", "speedup_vs_ray1", "speedup_vs_local",
                       "job_s_mean", "render_p50_ms", "render_p95_ms", "lost_jobs", "lost_results", "worker_killed",
                       "states"], title=f"scale-out: {n} PTI jobs of {steps} per row, held-out faces (seed {FACE_SEED})")
    write_json(args.json, rows, steps=steps, jobs=n, face_seed=FACE_SEED)


if __name__ == "__main__":
    main()
