"""Persistent plugin settings in Krita's own settings file (kritarc, group ``latent_edit``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ._common import client as cl
from ._common import paths

GROUP = "latent_edit"


def default_token_file() -> str:
    """DATA_DIR/token of the server's default data folder (the server started without --data-dir)."""
    return paths.default_token_file()


@dataclass
class Settings:
    server_url: str = cl.DEFAULT_URL
    token_file: str = ""  # empty: default_token_file()
    model: str = ""  # empty: the server's default model
    method: str = "pti"
    align: bool = True  # "Detect and align the face"
    feather: float = -1.0  # < 0: the server's default (GET /v1/models "defaults")
    project_steps: int = 0  # 0: the method's default
    use_selection: bool = True
    each_region: bool = False  # "Each selected region is a face"
    live_preview: bool = True
    segments: str = "selection"  # flow.SEGMENT_CHOICES
    keep_detail: bool = False  # "Keep photo detail" (render fusion "relevance")

    def resolved_token_file(self) -> str:
        return os.path.expanduser(self.token_file) if self.token_file else default_token_file()

    def client(self):
        return cl.Client(self.server_url, token_file=self.resolved_token_file())


def load(app) -> Settings:
    """Read settings with ``app.readSetting(group, key, default)`` (Krita stores strings)."""
    s = Settings()
    for f in fields(Settings):
        raw = app.readSetting(GROUP, f.name, str(getattr(s, f.name)))
        try:
            setattr(s, f.name, _cast(type(getattr(s, f.name)), raw))
        except (TypeError, ValueError):
            pass  # keep the default for a corrupt entry
    return s


def save(app, s: Settings) -> None:
    for f in fields(Settings):
        app.writeSetting(GROUP, f.name, str(getattr(s, f.name)))


def _cast(kind, raw):
    if kind is bool:
        if str(raw) not in ("True", "False"):
            raise ValueError(raw)
        return str(raw) == "True"
    if kind is float:
        return float(raw)
    if kind is int:
        return int(float(raw))
    return str(raw)
