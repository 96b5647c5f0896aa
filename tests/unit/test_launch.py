"""server.launch.stop_process: SIGTERM first, SIGKILL after the timeout, nothing for a process that ended."""
from __future__ import annotations

import signal
import subprocess
import sys

from server.launch import stop_process


def child(code: str) -> subprocess.Popen:
    """A Python child that prints one line once it is set up, so the test never races its start."""
    proc = subprocess.Popen([sys.executable, "-c", code + "\nprint('up', flush=True)\nimport time\ntime.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_terminates_a_running_process():
    proc = child("")
    stop_process(proc, 10)
    assert proc.returncode == -signal.SIGTERM


def test_kills_a_process_that_ignores_sigterm():
    proc = child("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)")
    stop_process(proc, 0.5, kill_timeout=10)
    assert proc.returncode == -signal.SIGKILL


def test_leaves_an_ended_process_alone():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(30)
    stop_process(proc, 1)
    assert proc.returncode == 3
