"""Bearer-token authentication: the token file (created once, user-only readable) and the checks.

Standard library only: ``install.py`` runs :func:`ensure_token` with the system Python before the venv exists.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("server.auth")

MIN_TOKEN_CHARS = 16


def _check_token(path: Path, token: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise SystemExit(f"error: the token in {path} must be one line of at least {MIN_TOKEN_CHARS} "
                         "non-space characters; delete the file to have a new one generated")
    return token


def ensure_token(path: Path) -> tuple[str, bool]:
    """The one token writer (the server and install.py both call it): read the token at ``path`` or, when the
    file is missing or empty, write a new one (32 random bytes, url-safe, mode 0600; its folder made 0700 when
    created here).  A token readable by others is tightened to 0600.  Returns ``(token, created)``."""
    path = Path(path)
    created = False
    if not path.exists() or not path.read_text(encoding="utf-8").strip():
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        try:  # atomic: a concurrent writer's token wins whole, never half of each
            os.link(tmp, path)
            created = True
        except FileExistsError:
            if not path.read_text(encoding="utf-8").strip():
                os.replace(tmp, path)
                created = True
        except OSError:  # no hard links on this file system
            os.replace(tmp, path)
            created = True
        finally:
            if tmp.exists():
                tmp.unlink()
        if created:
            log.info("created a new auth token in %s (mode 0600)", path)
    token = _check_token(path, path.read_text(encoding="utf-8").strip())
    if os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("token file %s is readable by others (mode %o); tightening to 0600", path, mode)
            try:
                os.chmod(path, 0o600)
            except OSError as exc:
                log.warning("could not chmod %s: %s", path, exc)
    return token, created


def load_or_create_token(path: Path) -> str:
    """The server's start-up: :func:`ensure_token` without the flag."""
    return ensure_token(path)[0]


def token_matches(presented: Optional[str], expected: str) -> bool:
    """Constant-time comparison (no early exit on the first differing byte)."""
    if not presented:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def bearer(header: Optional[str]) -> Optional[str]:
    """The token in an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


class StatusCredentials:
    """Short-lived credentials for the status page's cookie, so the API token never sits in a browser.

    Issued after ``/?token=`` proved the API token; valid ``ttl_s`` seconds, for this server process only, and
    only for the status page (never the API).  At most ``max_live`` are kept (oldest dropped)."""

    def __init__(self, ttl_s: float, max_live: int = 64):
        self.ttl_s, self.max_live = ttl_s, max_live
        self._live: dict = {}  # credential -> expiry (monotonic)
        self._lock = threading.Lock()

    def issue(self) -> str:
        cred = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._live = {c: t for c, t in self._live.items() if t > now}
            while len(self._live) >= self.max_live:
                self._live.pop(next(iter(self._live)))
            self._live[cred] = now + self.ttl_s
        return cred

    def valid(self, presented: Optional[str]) -> bool:
        if not presented:
            return False
        now = time.monotonic()
        with self._lock:
            live = [c for c, t in self._live.items() if t > now]
        # constant time per comparison; the set is small
        return any(hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), c.encode()) for c in live)
