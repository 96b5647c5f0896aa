"""Load test of the server: N concurrent clients mixing health, session creation, renders and cancels.

Starts its own ``python -m server`` on 127.0.0.1 (a fresh data dir; a tiny random generator saved into a
models folder, or with ``--fake`` the test suite's fake engine), runs for the given time, then drains:
every job the clients were told about must exist on the server exactly once and end in a final state.

    python bench/load.py            # 20 clients, 120 s
    python bench/load.py --quick    # 6 clients, 30 s
Rows: one per operation with p50/p95 latency; the idle health latency measured first is the baseline
(``ratio_p50`` = loaded p50 / idle p50); ``render (engine)`` is the server-side render time without queueing.
RSS of the server process is printed before and after.  Like users, each client renders recent sessions: renders
pick among the newest ``clients`` finished sessions.

The server runs with its DEFAULT settings (queue 16, 4 live sessions, connection cap, body limits), so the
numbers are what users see; ``--live-sessions N`` overrides the one setting that changes render latency most.
Only retention is raised (``--keep-jobs``), so that every job the clients were told about can be audited at
the end; it does not change latency.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

from _util import ROOT, parse_args, print_table, write_json

from server.launch import port_of, wait_for_ready

MSGPACK = "application/msgpack"
TERMINAL = {"done", "failed", "cancelled", "interrupted"}


def extra_args(p) -> None:
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 20, quick 6)")
    p.add_argument("--seconds", type=float, default=None, help="duration (default 120, quick 30)")
    p.add_argument("--fake", action="store_true", help="use the test suite's fake engine instead of core")
    p.add_argument("--steps", type=int, default=4, help="projection steps per session (tiny inputs)")
    p.add_argument("--live-sessions", type=int, default=None, help="server --live-sessions (default: the server's, 4)")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def tiny_models_dir(root: Path) -> Path:
    """A random 32 px StyleGAN2 saved with core's own writer (what a user's models folder would hold)."""
    import torch

    from core.stylegan2.formats import save_generator
    from core.stylegan2.network import Generator, GeneratorConfig

    torch.manual_seed(0)
    cfg = GeneratorConfig(resolution=32, z_dim=32, w_dim=32, mapping_layers=2, channels={4: 32, 8: 32, 16: 32, 32: 16})
    d = root / "models"
    d.mkdir()
    save_generator(Generator(cfg).eval(), d / "tiny32.pt")
    return d


def start_server(data_dir: Path, fake: bool, models_dir: Path | None, live_sessions: int | None):
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir),
           "--log-level", "warning", "--device", "cpu", "--keep-jobs", "1000000"]
    if live_sessions is not None:
        cmd += ["--live-sessions", str(live_sessions)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "server")]))
    if fake:
        cmd += ["--engine", "fake_engine:make_engine"]
        env["FAKE_STEP_S"] = "0.02"
    else:
        cmd += ["--models-dir", str(models_dir)]
    log = open(data_dir.parent / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    url = wait_for_ready(proc, 180)
    if url is None:
        proc.kill()
        raise SystemExit("server did not start; see " + log.name)
    return proc, port_of(url), (data_dir / "token").read_text().strip()


def wire(arr: np.ndarray, fmt: str) -> dict:
    h, w = arr.shape[:2]
    return {"width": w, "height": h, "format": fmt, "stride": arr.strides[0], "data": arr.tobytes()}


class Stats:
    def __init__(self):
        self.lat: dict = {}
        self.codes: dict = {}
        self.accepted: list = []  # every job id a 202 answered with, in order
        self.sessions_ready: list = []

    def add(self, op: str, status: int, ms: float) -> None:
        self.lat.setdefault(op, []).append(ms)
        self.codes.setdefault(op, {}).setdefault(status, 0)
        self.codes[op][status] += 1


async def run_load(port: int, token: str, model: str, directions: list, clients: int, seconds: float, steps: int):
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}", "Accept": MSGPACK}
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    img[..., 3] = 255
    sel = np.zeros((32, 32, 1), np.uint8)
    sel[8:24, 8:24] = 255
    create_body = msgpack.packb({"layer": wire(img, "rgba8"), "selection": wire(sel, "gray8"), "model": model,
                                 "method": "pti", "align": "none",
                                 "options": {"project_steps": steps, "tune_steps": 2}}, use_bin_type=True)
    stats = Stats()

    async def call(s, op, method, path, body=None):
        headers = dict(auth)
        if body is not None:
            headers["Content-Type"] = MSGPACK
        t0 = time.perf_counter()
        async with s.request(method, base + path, data=body, headers=headers) as r:
            raw = await r.read()
        ms = (time.perf_counter() - t0) * 1000
        stats.add(op, r.status, ms)
        out = msgpack.unpackb(raw, raw=False) if raw and r.content_type == MSGPACK else None
        if r.status == 202 and out and "job_id" in out and op in ("create", "cancel-create"):
            stats.accepted.append(out["job_id"])
        if r.status == 200 and op == "render":
            stats.lat.setdefault("render (engine)", []).append(out["elapsed_ms"])
        return r.status, out

    async def wait_done(s, job_id, timeout=300):
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            st, j = await call(s, "job-poll", "GET", f"/v1/jobs/{job_id}")
            if st == 200 and j["state"] in TERMINAL:
                return j["state"]
            await asyncio.sleep(0.1)
        return None

    async with aiohttp.ClientSession() as s:
        # idle baseline before any load
        for _ in range(50):
            await call(s, "health (idle)", "GET", "/v1/health")
        # seed sessions for renders
        for _ in range(2):
            st, out = await call(s, "create", "POST", "/v1/sessions", create_body)
            if st == 202 and await wait_done(s, out["job_id"]) == "done":
                stats.sessions_ready.append(out["session_id"])
        if not stats.sessions_ready:
            raise SystemExit("could not create a session to render")
        stop_at = time.monotonic() + seconds

        async def client(i: int):
            r = random.Random(i)
            async with aiohttp.ClientSession() as cs:
                while time.monotonic() < stop_at:
                    roll = r.random()
                    if roll < 0.4:
                        await call(cs, "health", "GET", "/v1/health")
                    elif roll < 0.55:
                        st, out = await call(cs, "create", "POST", "/v1/sessions", create_body)
                        if st == 202:
                            pending.append(out["job_id"])
                    elif roll < 0.9:
                        sid = r.choice(stats.sessions_ready[-clients:])
                        edits = [{"direction": r.choice(directions), "strength": round(r.uniform(-3, 3), 2)}]
                        await call(cs, "render", "POST", f"/v1/sessions/{sid}/render",
                                   msgpack.packb({"edits": edits}, use_bin_type=True))
                    else:
                        st, out = await call(cs, "cancel-create", "POST", "/v1/sessions", create_body)
                        if st == 202:
                            await call(cs, "cancel", "DELETE", f"/v1/jobs/{out['job_id']}")
                    await asyncio.sleep(r.uniform(0, 0.05))

        pending: list = []

        async def promote():  # finished sessions join the render pool
            while time.monotonic() < stop_at:
                await asyncio.sleep(1.0)
                for jid in list(pending):
                    st, j = await call(s, "job-poll", "GET", f"/v1/jobs/{jid}")
                    if st == 200 and j["state"] in TERMINAL:
                        pending.remove(jid)
                        if j["state"] == "done":
                            stats.sessions_ready.extend(j["session_ids"])

        await asyncio.gather(promote(), *(client(i) for i in range(clients)))
        # drain: cancel what is still queued or running, then wait for every accepted job to end
        t_drain = time.perf_counter()
        for jid in stats.accepted:
            st, j = await call(s, "job-poll", "GET", f"/v1/jobs/{jid}")
            if st == 200 and j["state"] not in TERMINAL:
                await call(s, "drain-cancel", "DELETE", f"/v1/jobs/{jid}")
        finals = {jid: await wait_done(s, jid) for jid in stats.accepted}
        drain_s = time.perf_counter() - t_drain
        st, listing = await call(s, "job-list", "GET", "/v1/jobs?limit=10000")
        server_ids = [j["job_id"] for j in listing["jobs"]]
    return stats, finals, server_ids, drain_s


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra_args)
    clients = args.clients or (6 if args.quick else 20)
    seconds = args.seconds or (30.0 if args.quick else 120.0)
    tmp = Path(tempfile.mkdtemp(prefix="latent-edit-load-"))
    models_dir = None if args.fake else tiny_models_dir(tmp)
    proc, port, token = start_server(tmp / "data", args.fake, models_dir, args.live_sessions)
    try:
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {token}"})
        import json

        models = json.loads(urllib.request.urlopen(req, timeout=60).read())["models"]
        model = "fake32" if args.fake else "tiny32"
        directions = [d["name"] for m in models if m["name"] == model for d in m["directions"]]
        rss_before = rss_mb(proc.pid)
        stats, finals, server_ids, drain_s = asyncio.run(
            run_load(port, token, model, directions, clients, seconds, args.steps))
        rss_after = rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    idle_p50 = pct(stats.lat.get("health (idle)", []), 50)
    rows = []
    for op in ("health (idle)", "health", "render", "render (engine)", "create", "cancel-create", "cancel", "drain-cancel", "job-poll"):
        lat = stats.lat.get(op, [])
        codes = stats.codes.get(op, {})
        if op == "render (engine)":  # server-side time of the renders above, not requests of their own
            codes = {200: len(lat)}
        rows.append({"op": op, "n": len(lat), "ok_2xx": sum(v for k, v in codes.items() if 200 <= k < 300),
                     "rejected_429": codes.get(429, 0), "conflict_409": codes.get(409, 0),
                     "errors_5xx": sum(v for k, v in codes.items() if k >= 500),
                     "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "max_ms": max(lat) if lat else float("nan"),
                     "ratio_p50": pct(lat, 50) / idle_p50 if lat else float("nan")})
    accepted = stats.accepted
    dup_accepted = len(accepted) - len(set(accepted))
    dup_server = len(server_ids) - len(set(server_ids))
    missing = sorted(set(accepted) - set(server_ids))
    not_final = sorted(j for j, s in finals.items() if s is None)
    phantom = sorted(set(server_ids) - set(accepted))
    by_state: dict = {}
    for s in finals.values():
        by_state[s] = by_state.get(s, 0) + 1
    settings = "default settings" if args.live_sessions is None else f"--live-sessions {args.live_sessions}"
    print_table(rows, title=f"load: {clients} clients, {seconds:g} s, engine {'fake' if args.fake else 'core (tiny32)'}, "
                            f"server {settings}")
    ok = not (dup_accepted or dup_server or missing or not_final or phantom)
    print(f"jobs accepted {len(accepted)}; final states {by_state}; drained in {drain_s:.1f} s")
    print(f"lost (accepted but missing or never final): {len(missing) + len(not_final)}; duplicated ids: "
          f"{dup_accepted + dup_server}; unknown jobs on the server: {len(phantom)} -> {'OK' if ok else 'FAIL'}")
    print(f"server RSS before {rss_before:.1f} MiB, after {rss_after:.1f} MiB")
    write_json(args.json, rows, clients=clients, seconds=seconds, engine="fake" if args.fake else "core",
               jobs_accepted=len(accepted), final_states=by_state, lost=len(missing) + len(not_final),
               duplicated=dup_accepted + dup_server, phantom=len(phantom), rss_before_mb=rss_before,
               rss_after_mb=rss_after, drain_s=drain_s, ok=ok)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
