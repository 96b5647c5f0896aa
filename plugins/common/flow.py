"""The host-agnostic edit flow both plugins share: names for results, edit strings, the default token
location, and "send a layer, wait for the inversion, render the edits" over :mod:`client`.

Standard library only. Hosts supply pixels (already packed with :mod:`pixels`) and a progress callback;
they never talk HTTP themselves.
"""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

GROUP_PREFIX = "Latent Edit"
SEP = " · "


class FlowError(Exception):
    """A choice the user must correct (message shown as is)."""


def format_strength(strength: float) -> str:
    """1.5 -> "+1.5", -2 -> "-2", 0.125 -> "+0.13" (two decimals at most, no trailing zeros)."""
    s = "%+.2f" % float(strength)
    s = s.rstrip("0").rstrip(".")
    return "+0" if s in ("+", "-", "-0", "+0") else s


def edit_label(edits) -> str:
    """[("smile", 1.5), ("age", -2)] -> "smile +1.5, age -2"; no edits -> "reconstruction"."""
    parts = ["%s %s" % (name, format_strength(strength)) for name, strength in edits]
    return ", ".join(parts) if parts else "reconstruction"


def edit_title(edits) -> str:
    """The result group's name: "Latent Edit · smile +1.5"."""
    return GROUP_PREFIX + SEP + edit_label(edits)


_EDIT = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*[=:]?\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*$")


def parse_edits(text: str):
    """"smile=1.5; age -1, gaze:+0.5" -> [("smile", 1.5), ("age", -1.0), ("gaze", 0.5)]."""
    edits = []
    for part in re.split(r"[;,\n]", text or ""):
        if not part.strip():
            continue
        m = _EDIT.match(part)
        if not m:
            raise FlowError("cannot read the edit %r; write it as name=strength, e.g. smile=1.5" % part.strip())
        edits.append((m.group(1), float(m.group(2))))
    return edits


def default_data_dir() -> Path:
    """The server's default data folder on this OS (where it writes ``token``)."""
    system = platform.system()
    if system == "Windows":
        base = Path(os.environ.get("LOCALAPPDATA", str(Path.home() / "AppData" / "Local")))
    elif system == "Darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", str(Path.home() / ".local" / "share")))
    return base / "latent-edit"


def default_token_file() -> str:
    return str(default_data_dir() / "token")


@dataclass
class EditResult:
    session_id: str
    job_id: str
    layer: dict  # the protocol's layer map (RGBA at the input's size, alpha = composite mask)


def edit_layer(client, layer: dict, selection, edits, model=None, method="pti", align="auto", options=None,
               on_progress=None, should_cancel=None, session_id=None) -> EditResult:
    """Invert ``layer`` (unless ``session_id`` names a finished session to re-use) and render ``edits``.

    ``on_progress(job_dict)`` is called after each poll; ``should_cancel()`` stops the job on the server.
    Raises client errors (JobFailed, JobCancelled, ServerNotRunning, ...) with user-facing messages.
    """
    job_id = ""
    if session_id is None:
        created = client.create_session(layer, selection=selection, model=model, method=method, align=align,
                                        options=options)
        session_id, job_id = created["session_id"], created["job_id"]
        client.wait_job(job_id, on_progress=on_progress, should_cancel=should_cancel)
    rendered = client.render(session_id, edits, feather=(options or {}).get("feather"))
    from .client import result_layers

    return EditResult(session_id, job_id, result_layers(rendered)[0])
