"""Starting ``python -m server`` from other programs (tests, benchmarks, scripts): its ready line.

Once it listens, the server prints exactly one line to stdout, ``latent-edit server ready at URL``;
:func:`wait_for_ready` reads a child process's stdout until that line and returns the URL;
:func:`stop_process` ends such a child again.
"""
from __future__ import annotations

import subprocess
import threading
import urllib.parse
from typing import Optional

READY_PREFIX = "latent-edit server ready at "


def ready_line(url: str) -> str:
    return f"{READY_PREFIX}{url}"


def wait_for_ready(proc: subprocess.Popen, timeout: float) -> Optional[str]:
    """The server's URL (``http://host:port``, no trailing slash) from ``proc``'s text stdout, or None when the
    process ended or ``timeout`` seconds passed before the ready line."""
    found: list[str] = []

    def read():
        for line in proc.stdout:
            if line.startswith(READY_PREFIX):
                found.append(line[len(READY_PREFIX):].strip().rstrip("/"))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else None


def port_of(url: str) -> int:
    return int(urllib.parse.urlsplit(url).port)


def stop_process(proc: subprocess.Popen, timeout: float, kill_timeout: Optional[float] = None) -> None:
    """Stop ``proc`` if it still runs: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL and wait up to
    ``kill_timeout`` seconds (default: ``timeout``). A process that already ended is left as it is."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout if kill_timeout is None else kill_timeout)
