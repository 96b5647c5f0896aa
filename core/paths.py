"""Where the server keeps its data on this OS: one definition for the server, install.py and the plugins.

Standard library only (``import core.paths`` never imports torch): the host plugins carry this very file
through the symlink ``plugins/common/paths.py`` and run it inside Krita's / GIMP's own Python.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path


def default_data_dir() -> Path:
    """The server's default data folder: sessions, job inputs, SQLite and the token file ``token``."""
    system = platform.system()
    if system == "Windows":
        base = Path(os.environ.get("LOCALAPPDATA", str(Path.home() / "AppData" / "Local")))
    elif system == "Darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", str(Path.home() / ".local" / "share")))
    return base / "latent-edit"


def default_token_file() -> str:
    """The bearer token the server writes (mode 0600) and the plugins read."""
    return str(default_data_dir() / "token")
