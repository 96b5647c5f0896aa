"""Bearer-token authentication: the token file (created once, user-only readable) and the checks."""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Optional

log = logging.getLogger("server.auth")

MIN_TOKEN_CHARS = 16
COOKIE = "latent_edit_token"


def load_or_create_token(path: Path) -> str:
    """Read the token at ``path``; create it (mode 0600, 32 random bytes, url-safe) when missing."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it in between: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            log.info("created a new auth token in %s (mode 0600)", path)
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise SystemExit(f"error: the token in {path} must be one line of at least {MIN_TOKEN_CHARS} "
                         "non-space characters; delete the file to have a new one generated")
    if os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("token file %s is readable by others (mode %o); tightening to 0600", path, mode)
            try:
                os.chmod(path, 0o600)
            except OSError as exc:
                log.warning("could not chmod %s: %s", path, exc)
    return token


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
