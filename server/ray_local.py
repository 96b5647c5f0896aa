"""A Ray cluster of several nodes on this one machine (the Ray backend's tests and bench/scaleout.py).

Each node is ``ray start --block`` in its own process group, so one node can be killed whole (its raylet and
every worker process on it) while the others keep running: what a studio sees when a GPU box dies.  The
nodes require a token of their own (Ray's token authentication): whoever drives the cluster — a server, a
test — needs ``auth_env`` in its environment *before it imports ray* (Ray reads it once).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))  # the CLI beside this interpreter (the venv's)


class LocalCluster:
    """``nodes`` Ray nodes on this machine with ``cpus`` logical CPUs each; node 0 is the head.

    ``pythonpath``: extra folders the nodes' worker processes import from (the checkout is always first)."""

    def __init__(self, nodes: int = 2, cpus: int = 1, pythonpath=(), object_store_mb: int = 200,
                 start_timeout_s: float = 120.0):
        self.temp = tempfile.mkdtemp(prefix="le-ray-", dir="/tmp")  # short: Ray's socket paths must fit
        self.cpus, self.start_timeout_s = cpus, start_timeout_s
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *map(str, pythonpath)]),
                        OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", **self.auth_env)
        self.flags = ["--num-cpus", str(cpus), "--object-store-memory", str(object_store_mb * 1024 * 1024),
                      "--disable-usage-stats", "--block"]
        self.procs: list = []
        self.address: Optional[str] = None
        try:
            head = self._start(["--head", "--port", "0", "--include-dashboard", "false", "--temp-dir", self.temp])
            m = re.search(r"--address='([^']+)'", self._wait_started(head))
            if not m:
                raise RuntimeError(f"no cluster address in the head node's output:\n{head.log_path.read_text()[-2000:]}")
            self.address = m.group(1)
            for _ in range(nodes - 1):
                self.add_node()
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list) -> subprocess.Popen:
        path = Path(self.temp) / f"node{len(self.procs)}.log"
        with open(path, "w") as log:
            proc = subprocess.Popen([RAY, "start", *args, *self.flags], stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True)
        proc.log_path = path
        self.procs.append(proc)
        return proc

    def _wait_started(self, proc: subprocess.Popen) -> str:
        """Block until the node's `ray start` says it is up (reads its log; RuntimeError when it exits first)."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            text = proc.log_path.read_text()
            if "Ray runtime started" in text:
                return text
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not come up (exit {proc.returncode}):\n{text[-3000:]}")
            time.sleep(0.2)  # a child's log line has no other signal; bounded by the deadline

    def add_node(self) -> int:
        """Start one more node; its index."""
        proc = self._start(["--address", self.address])
        self._wait_started(proc)
        return len(self.procs) - 1

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index``'s whole process group (raylet and its workers), as when a machine dies."""
        proc = self.procs[index]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
        shutil.rmtree(self.temp, ignore_errors=True)
