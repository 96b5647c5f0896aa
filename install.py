#!/usr/bin/env python3
"""Set up Latent Edit: a virtual environment with the engine and server, a ``latent-edit-server`` launcher,
the Krita and GIMP plugins, the server's auth token, and (when the download host answers) the ImageNet
backbones LPIPS needs (SHA-256 checked; offline the install still succeeds, with a notice).

    python3 install.py                 # .venv in this checkout, launcher, plugins into the hosts found, token
    python3 install.py --check         # report what is installed and what is missing (exit 1 if anything is)
    python3 install.py --uninstall     # remove what install.py added (the venv, plugins, kritarc entry)
    python3 install.py --weights lpips # require the LPIPS backbones (an offline install then fails)
    python3 install.py --no-weights    # do not try to download any weights
    python3 install.py --with ray      # also Ray, for python -m server --backend ray (docs/scaleout.md)

Standard library only: it runs with the system Python before anything is installed.  Idempotent:
a second run finds every step done and says "nothing to do".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from plugins import install_plugins as ip  # noqa: E402  (standard library only, like this file)
from core.paths import default_data_dir  # noqa: E402  (the server's default data folder; standard library only)
from server.auth import ensure_token  # noqa: E402  (the one token writer, standard library only)

MIN_PYTHON, MAX_PYTHON = (3, 10), (3, 13)
TORCH_VERSION = "2.13.0"
STATE_FILE = "latent-edit-install.json"
# Packages installed without their dependencies: we only read their bundled weight files
# (lpips: the calibrated linear heads; facenet-pytorch: MTCNN's three small networks).
# Their declared dependencies would pull in torchvision, which has no CPU build for this torch.
NO_DEPS_PACKAGES = ["lpips==0.1.4", "facenet-pytorch==2.6.0"]

# Weights fetched from their official locations, checked by SHA-256.  For the torchvision files the
# checksum prefix is part of the published file name (torch.hub checks the same prefix).
WEIGHTS = {
    "lpips": [
        ("https://download.pytorch.org/models/vgg16-397923af.pth", "hub/checkpoints/vgg16-397923af.pth", "397923af"),
        ("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "hub/checkpoints/alexnet-owt-7be5be79.pth", "7be5be79"),
    ],
}
# Optional packages: --with NAME installs them (and --check then requires them).  {name: (pip specs, import probe)}
EXTRAS = {
    "ray": (["ray==2.60.0"], "import ray"),  # python -m server --backend ray: a studio's GPU pool (docs/scaleout.md)
}
DEFAULT_WEIGHTS = ["lpips"]  # fetched by default when the host answers; without them LPIPS uses its fallback
REACH_TIMEOUT_S = 4.0  # how long an offline machine waits before the install goes on without the weights
DOWNLOAD_TIMEOUT_S = 120.0
LAUNCHER = "latent-edit-server"


class InstallError(Exception):
    """A problem the user must fix; printed as one clear line."""


# ----------------------------------------------------------------------------------------------
# where things go
# ----------------------------------------------------------------------------------------------

def krita_present() -> bool:
    return (bool(shutil.which("krita")) or ip.default_pykrita_dir().parent.exists()
            or Path("/Applications/krita.app").exists())


def gimp_present() -> bool:
    names = ("gimp-3.0", "gimp-3", "gimp", "gimp-console-3.0")
    return (any(shutil.which(n) for n in names) or ip.default_gimp_plugins_dir().parent.exists()
            or Path("/Applications/GIMP.app").exists())


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if platform.system() == "Windows" else "bin/python")


def launcher_path(venv: Path) -> Path:
    """The server start command install.py writes: works from any folder (the checkout is on its path)."""
    return venv / ("Scripts/%s.cmd" % LAUNCHER if platform.system() == "Windows" else "bin/" + LAUNCHER)


def launcher_text(venv: Path) -> str:
    py, root = venv_python(venv), ROOT
    if platform.system() == "Windows":
        return f'@echo off\r\nset "PYTHONPATH={root};%PYTHONPATH%"\r\n"{py}" -m server %*\r\n'
    return (f"#!/bin/sh\n# Start the Latent Edit server (written by install.py; arguments: see python -m server --help)\n"
            f"PYTHONPATH='{root}'${{PYTHONPATH:+:$PYTHONPATH}} exec '{py}' -m server \"$@\"\n")


# ----------------------------------------------------------------------------------------------
# steps: each has check() -> list of missing things, and apply()
# ----------------------------------------------------------------------------------------------

def _run(cmd: list[str], what: str) -> None:
    print(f"  $ {' '.join(str(c) for c in cmd)}", flush=True)
    proc = subprocess.run([str(c) for c in cmd])
    if proc.returncode != 0:
        raise InstallError(f"{what} failed (exit {proc.returncode}); see the output above")


def _requirements_digest() -> str:
    h = hashlib.sha256()
    for name in ("requirements.txt", "requirements-dev.txt"):
        h.update((ROOT / name).read_bytes())
    h.update(" ".join(NO_DEPS_PACKAGES).encode())
    return h.hexdigest()


def has_nvidia_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class Installer:
    venv: Path
    plugins: bool = True
    krita_dir: Path | None = None
    kritarc: Path | None = None
    gimp_dir: Path | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    weights: list[str] = field(default_factory=lambda: list(DEFAULT_WEIGHTS))
    weights_required: bool = False  # --weights: a failed download is an error, and --check reports them
    torch_index: str | None = None
    extras: list[str] = field(default_factory=list)  # names in EXTRAS (--with)
    notes: list[str] = field(default_factory=list)

    # --- state ---------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.venv / STATE_FILE

    def load_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def save_state(self, state: dict) -> None:
        self.state_path.write_text(json.dumps(state, indent=2, sort_keys=True))

    # --- venv and packages ---------------------------------------------------------------------
    def venv_missing(self) -> list[str]:
        py = venv_python(self.venv)
        if not py.exists():
            return [f"virtual environment {self.venv}"]
        if self.load_state().get("requirements") != _requirements_digest():
            return [f"packages in {self.venv} (requirements changed or never installed)"]
        probe = "import torch, numpy, PIL, aiohttp, msgpack, pytest, hypothesis, skimage, matplotlib"
        if subprocess.run([str(py), "-c", probe], capture_output=True).returncode != 0:
            return [f"packages in {self.venv} (an import fails: {probe})"]
        return []

    def install_venv(self) -> None:
        py = venv_python(self.venv)
        if not py.exists():
            print(f"creating virtual environment {self.venv}")
            _run([sys.executable, "-m", "venv", self.venv], "creating the virtual environment")
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
        torch_cmd = pip + [f"torch=={TORCH_VERSION}"]
        if self.torch_index:
            torch_cmd += ["--index-url", self.torch_index]
        elif has_nvidia_gpu():
            print("NVIDIA GPU found: installing the CUDA build of torch")
        else:
            print("no GPU found: installing torch for CPU (pip's configured sources decide the build; "
                  "pass --torch-index https://download.pytorch.org/whl/cpu for the small CPU-only wheel)")
        _run(torch_cmd, "installing torch")
        _run(pip + ["-r", ROOT / "requirements.txt", "-r", ROOT / "requirements-dev.txt"], "installing requirements")
        _run(pip + ["--no-deps"] + NO_DEPS_PACKAGES, "installing weight-carrying packages")
        state = self.load_state()
        state["requirements"] = _requirements_digest()
        self.save_state(state)

    def extras_missing(self) -> list[str]:
        py = venv_python(self.venv)
        return [f"optional package {name} ({' '.join(EXTRAS[name][0])}) in {self.venv}" for name in self.extras
                if not py.exists() or subprocess.run([str(py), "-c", EXTRAS[name][1]], capture_output=True).returncode]

    def install_extras(self) -> None:
        py = venv_python(self.venv)
        specs = [spec for name in self.extras for spec in EXTRAS[name][0]]
        _run([py, "-m", "pip", "install", "--disable-pip-version-check", *specs], "installing " + " ".join(specs))

    # --- launcher --------------------------------------------------------------------------------
    def launcher_missing(self) -> list[str]:
        path = launcher_path(self.venv)
        try:
            ok = path.read_text() == launcher_text(self.venv)
        except OSError:
            ok = False
        return [] if ok else [f"server launcher {path}"]

    def write_launcher(self) -> None:
        path = launcher_path(self.venv)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(launcher_text(self.venv))
        path.chmod(0o755)
        print(f"wrote the server launcher {path}")

    # --- plugins ---------------------------------------------------------------------------------
    def plugin_targets(self) -> list[tuple[str, Path, Path | None]]:
        """(host, folder, kritarc) for each host to install into; notes the skipped ones."""
        targets = []
        if not self.plugins:
            return targets
        if self.krita_dir or krita_present():
            targets.append(("krita", self.krita_dir or ip.default_pykrita_dir(), self.kritarc or ip.default_kritarc()))
        else:
            self.notes.append("Krita not found: Krita plugin skipped (use --krita-dir to install anyway)")
        if self.gimp_dir or gimp_present():
            targets.append(("gimp", self.gimp_dir or ip.default_gimp_plugins_dir(), None))
        else:
            self.notes.append("GIMP 3 not found: GIMP plug-in skipped (use --gimp-dir to install anyway)")
        return targets

    def plugins_missing(self) -> list[str]:
        missing = []
        for host, folder, kritarc in self.plugin_targets():
            if host == "krita":
                missing += ip.check_krita(folder, kritarc)
            else:
                missing += ip.check_gimp(folder)
        return missing

    def install_plugins(self) -> None:
        state = self.load_state()
        for host, folder, kritarc in self.plugin_targets():
            try:
                if host == "krita":
                    ip.install_krita(folder, kritarc)
                else:
                    ip.install_gimp(folder)
            except PermissionError as exc:
                raise InstallError(f"no write permission for the {host} plugin folder {folder}: {exc.strerror} "
                                   f"(choose another with --{host}-dir)") from None
            state.setdefault("plugins", {})[host] = {"folder": str(folder), "kritarc": str(kritarc) if kritarc else None}
            print(f"installed the {host} plugin into {folder}")
        self.save_state(state)

    # --- token -------------------------------------------------------------------------------------
    @property
    def token_path(self) -> Path:
        return self.data_dir / "token"

    def token_missing(self) -> list[str]:
        return [] if self.token_path.is_file() and self.token_path.read_text().strip() else [f"auth token {self.token_path}"]

    def write_token(self) -> None:
        ensure_token(self.token_path)  # the server's own writer: mode 0600, the data folder 0700 when made here
        print(f"wrote the server's auth token to {self.token_path} (readable by you only)")

    # --- weights -----------------------------------------------------------------------------------
    def torch_home(self) -> Path:
        return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))

    def weights_missing(self) -> list[str]:
        missing = []
        for name in self.weights:
            for _url, rel, _sha in WEIGHTS[name]:
                if not (self.torch_home() / rel).is_file():
                    missing.append(f"{name} weights {self.torch_home() / rel}")
        return missing

    def _reachable(self, url: str) -> str | None:
        """None when the download host answers within REACH_TIMEOUT_S, else the reason."""
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=REACH_TIMEOUT_S).close()
            return None
        except urllib.error.HTTPError:
            return None  # the host answered
        except (urllib.error.URLError, OSError) as exc:
            return getattr(exc, "reason", None) and str(exc.reason) or exc.__class__.__name__

    def fetch_weights(self) -> bool:
        """Download the missing weights (SHA-256 checked); True when something was downloaded. Offline:
        a notice (an error only with --weights)."""
        got = False
        for name in self.weights:
            todo = [(u, r, h) for u, r, h in WEIGHTS[name] if not (self.torch_home() / r).is_file()]
            if not todo:
                continue
            why = self._reachable(todo[0][0])
            if why is not None:
                msg = (f"{name} weights not downloaded ({todo[0][0]} unreachable: {why}); the server uses the "
                       "LPIPS fallback and says so in /v1/health. Run install.py again when online.")
                if self.weights_required:
                    raise InstallError(msg)
                self.notes.append("offline: " + msg)
                continue
            for url, rel, sha_prefix in todo:
                dest = self.torch_home() / rel
                print(f"downloading {url}")
                try:
                    data = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S).read()
                except (urllib.error.URLError, OSError) as exc:
                    if self.weights_required:
                        raise InstallError(f"downloading {url} failed: {exc}") from None
                    self.notes.append(f"download of {url} failed ({exc.__class__.__name__}); {name} weights skipped")
                    break
                digest = hashlib.sha256(data).hexdigest()
                if not digest.startswith(sha_prefix):
                    raise InstallError(f"checksum mismatch for {url}: sha256 {digest} does not start with {sha_prefix}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_suffix(".part")
                tmp.write_bytes(data)
                tmp.replace(dest)
                got = True
                print(f"  verified sha256 {digest[:16]}… -> {dest}")
        return got

    # --- driver -----------------------------------------------------------------------------------
    def missing(self) -> list[str]:
        weights = self.weights_missing() if self.weights_required else []
        return (self.venv_missing() + self.extras_missing() + self.launcher_missing() + self.plugins_missing()
                + self.token_missing() + weights)

    def install(self) -> int:
        did = False
        if self.venv_missing():
            self.install_venv()
            did = True
        if self.extras_missing():
            self.install_extras()
            did = True
        if self.launcher_missing():
            self.write_launcher()
            did = True
        if self.plugins_missing():
            self.install_plugins()
            did = True
        if self.token_missing():
            self.write_token()
            did = True
        if self.weights_missing() and self.fetch_weights():
            did = True
        for note in self.notes:
            print(f"note: {note}")
        print("Latent Edit is installed." if did else "nothing to do: everything is already installed.")
        print(f"  start the server:  {launcher_path(self.venv)}")
        print(f"  try it:            {venv_python(self.venv)} -m core demo --out demo-out")
        return 0

    def check(self) -> int:
        missing = self.missing()
        for note in self.notes:
            print(f"note: {note}")
        if missing:
            print("missing:")
            for m in missing:
                print(f"  - {m}")
            return 1
        print("everything is installed")
        return 0

    def uninstall(self) -> int:
        state = self.load_state()
        for host, info in state.get("plugins", {}).items():
            folder = Path(info["folder"])
            if host == "krita":
                ip.uninstall_krita(folder, Path(info["kritarc"]) if info.get("kritarc") else None)
            else:
                ip.uninstall_gimp(folder)
            print(f"removed the {host} plugin from {folder}")
        if self.venv.exists():
            shutil.rmtree(self.venv)
            print(f"removed {self.venv}")
        print(f"kept {self.data_dir} (your sessions and token); delete it by hand if you want them gone")
        return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Install Latent Edit (engine, server, Krita and GIMP plugins).")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv", help="virtual environment folder (default: .venv here)")
    p.add_argument("--no-plugins", action="store_true", help="do not install the Krita and GIMP plugins")
    p.add_argument("--krita-dir", type=Path, help="pykrita folder to install the Krita plugin into")
    p.add_argument("--kritarc", type=Path, help="kritarc file in which to enable the plugin")
    p.add_argument("--gimp-dir", type=Path, help="GIMP 3 plug-ins folder to install the GIMP plug-in into")
    p.add_argument("--data-dir", type=Path, default=None, help="server data folder holding the token (default: per-user)")
    p.add_argument("--weights", action="append", default=[], choices=sorted(WEIGHTS),
                   help="require these weights (downloaded from their official locations, SHA-256 checked); "
                        "by default lpips is fetched when the host answers and skipped with a notice offline")
    p.add_argument("--no-weights", action="store_true", help="do not download any weights")
    p.add_argument("--with", dest="extras", action="append", default=[], choices=sorted(EXTRAS),
                   help="also install an optional package: ray (python -m server --backend ray, a Ray cluster)")
    p.add_argument("--torch-index", help="pip index URL for torch (e.g. https://download.pytorch.org/whl/cpu)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report what is installed and missing; exit 1 if incomplete")
    mode.add_argument("--uninstall", action="store_true", help="remove what install.py added")
    return p.parse_args(argv)


def main(argv=None) -> int:
    if not (MIN_PYTHON <= sys.version_info[:2] <= MAX_PYTHON):
        print(f"error: Python {platform.python_version()} is not supported; use Python "
              f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} to {MAX_PYTHON[0]}.{MAX_PYTHON[1]} "
              f"(torch {TORCH_VERSION} has no build for it)", file=sys.stderr)
        return 2
    args = parse_args(argv)
    inst = Installer(
        venv=args.venv.resolve(),
        plugins=not args.no_plugins,
        krita_dir=args.krita_dir,
        kritarc=args.kritarc,
        gimp_dir=args.gimp_dir,
        data_dir=args.data_dir or default_data_dir(),
        weights=[] if args.no_weights else (args.weights or list(DEFAULT_WEIGHTS)),
        weights_required=bool(args.weights) and not args.no_weights,
        torch_index=args.torch_index,
        extras=list(dict.fromkeys(args.extras)),
    )
    try:
        if args.check:
            return inst.check()
        if args.uninstall:
            return inst.uninstall()
        return inst.install()
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
