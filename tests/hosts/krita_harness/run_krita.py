"""Run real Krita 5 headless under Xvfb with the Latent Edit plugin installed the way install.py does it.

``run_job(job, workdir)`` gives Krita an isolated HOME / XDG dirs / TMPDIR, installs the plugin with
``plugins.install_plugins.install_krita`` plus the test-only driver plugin next to it (``driver/``), points
``LATENT_EDIT_KRITA_JOB`` at the job file (see driver/latent_edit_test_driver/automation.py for its keys) and returns ``KritaRun(rc, result, log)``.
A warmed HOME (resource bundles unpacked, caches built) can be reused with ``home_template``: a cold
first start costs ~20 s more (krita-headless.md).

CLI (manual runs): ``python tests/hosts/krita_harness/run_krita.py job.json WORKDIR``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plugins.install_plugins import install_krita, set_ini_value  # noqa: E402

DRIVER = Path(__file__).resolve().parent / "driver"
DRIVER_NAME = "latent_edit_test_driver"

KRITA_PYTHON = "/usr/bin/python3"  # Debian's Krita embeds the system Python 3.11


def unavailable_reason() -> str | None:
    """Why real Krita cannot run here, or None when it can."""
    if sys.platform != "linux":
        return "the Krita host test drives Krita under Xvfb, which needs Linux"
    for exe, pkg in (("krita", "krita"), ("Xvfb", "xvfb"), ("timeout", "coreutils")):
        if shutil.which(exe) is None:
            return "%s is not installed (apt-get install krita python3-pyqt5 python3-sip xvfb)" % pkg
    py = KRITA_PYTHON if os.path.exists(KRITA_PYTHON) else shutil.which("python3")
    probe = subprocess.run([py, "-c", "import PyQt5.QtCore"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "PyQt5 is missing for Krita's Python (apt-get install python3-pyqt5): " + probe.stderr.strip()[-200:]
    return None


@dataclass
class KritaRun:
    rc: int
    result: dict
    log: str
    krita_log: str
    seconds: float
    out_dir: Path

    def describe(self) -> str:
        return ("krita rc=%d after %.1f s\nresult=%s\n--- plugin log ---\n%s\n--- krita output (tail) ---\n%s"
                % (self.rc, self.seconds, json.dumps(self.result, indent=1)[:4000], self.log[-4000:], self.krita_log[-3000:]))


def make_env(home: Path, run_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "QT_", "KDE_", "DISPLAY", "WAYLAND"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local" / "share"),
               XDG_CACHE_HOME=str(home / ".cache"), XDG_RUNTIME_DIR=str(run_dir / "run"), TMPDIR=str(run_dir / "tmp"))
    # Krita's embedded Python derives its prefix from the first python3 on PATH: a pyenv/conda/venv python
    # there hides the system's PyQt5 ("No module named 'PyQt5'", the plugin never loads, Krita idles).
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if not any(k in p for k in ("pyenv", "conda", "venv", ".virtualenvs")))
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX"):
        env.pop(key, None)  # Krita's Python must see only its own packages, like a user's install
    return env


def _display_free(n: int) -> bool:
    """No lock file and the abstract X socket name is unused (the abstract namespace is shared with other
    Xvfbs on this host, chroots included, whose lock files we cannot see)."""
    if os.path.exists("/tmp/.X%d-lock" % n) or os.path.exists("/tmp/.X11-unix/X%d" % n):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind("\0/tmp/.X11-unix/X%d" % n)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _accepts(n: int) -> bool:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect("/tmp/.X11-unix/X%d" % n)
        return True
    except OSError:
        return False
    finally:
        conn.close()


def start_xvfb(run_dir: Path, start_timeout: float = 30.0):
    """Start our own Xvfb on a free display (``xvfb-run -a`` and ``-displayfd`` both pick displays that
    another Xvfb on the machine may hold through the shared abstract socket namespace)."""
    first = 200 + os.getpid() % 300
    for n in list(range(first, 500)) + list(range(200, first)):
        if not _display_free(n):
            continue
        log = open(run_dir / "xvfb.log", "wb")
        proc = subprocess.Popen(["Xvfb", ":%d" % n, "-screen", "0", "1600x1200x24", "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + start_timeout
        while proc.poll() is None and time.monotonic() < deadline and not _accepts(n):
            time.sleep(0.05)  # waiting for an external process to open its socket
        if proc.poll() is None and _accepts(n):
            return proc, ":%d" % n
        proc.kill()
        proc.wait(5)
    raise RuntimeError("no Xvfb display could be started: " + (run_dir / "xvfb.log").read_text(errors="replace")[-2000:])


def run_job(job: dict, workdir, home_template=None, keep_home=None, timeout: float = 180.0) -> KritaRun:
    """Install the plugin into a fresh HOME, run Krita on ``job`` and collect what the plugin wrote."""
    workdir = Path(workdir)
    run_dir = Path(tempfile.mkdtemp(prefix="krita-run-", dir=workdir))
    home = run_dir / "home"
    if home_template and Path(home_template).is_dir():
        shutil.copytree(home_template, home, symlinks=True)
    else:
        home.mkdir(parents=True)
    for d in ("run", "tmp"):
        (run_dir / d).mkdir()
    os.chmod(run_dir / "run", 0o700)
    env = make_env(home, run_dir)
    pykrita, kritarc = Path(env["XDG_DATA_HOME"]) / "krita" / "pykrita", Path(env["XDG_CONFIG_HOME"]) / "kritarc"
    install_krita(pykrita, kritarc)
    shutil.rmtree(pykrita / DRIVER_NAME, ignore_errors=True)
    shutil.copytree(DRIVER / DRIVER_NAME, pykrita / DRIVER_NAME, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(DRIVER / (DRIVER_NAME + ".desktop"), pykrita / (DRIVER_NAME + ".desktop"))
    set_ini_value(kritarc, "python", "enable_" + DRIVER_NAME, "true")
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    job_path = run_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    env["LATENT_EDIT_KRITA_JOB"] = str(job_path)
    cmd = ["timeout", "-k", "10", str(int(timeout)), "krita", "--nosplash"]
    for attempt in range(3):
        t0 = time.monotonic()
        xvfb, display = start_xvfb(run_dir)
        env["DISPLAY"] = display
        try:
            with open(out_dir / "krita.log", "wb") as log:
                rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(run_dir))
        finally:
            xvfb.terminate()
            try:
                xvfb.wait(10)
            except subprocess.TimeoutExpired:
                xvfb.kill()
                xvfb.wait(5)
        seconds = time.monotonic() - t0
        shutil.copy(run_dir / "xvfb.log", out_dir / ("xvfb%d.log" % attempt))
        early = (out_dir / "krita.log").read_text(errors="replace")
        # another X server on this machine can take the display between our check and Krita's connect
        # (the abstract socket namespace is shared with chroots): start again on another display
        if rc == 0 or "could not connect to display" not in early:
            break
    if keep_home:
        shutil.rmtree(keep_home, ignore_errors=True)
        shutil.copytree(home, keep_home, symlinks=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    res_path = out_dir / "result.json"
    result = json.loads(res_path.read_text()) if res_path.exists() else {}
    read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
    return KritaRun(rc, result, read(out_dir / "log.txt"), read(out_dir / "krita.log"), seconds, out_dir)


if __name__ == "__main__":
    reason = unavailable_reason()
    if reason:
        sys.exit("cannot run Krita: " + reason)
    run = run_job(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
    print(run.describe())
    sys.exit(run.rc)
