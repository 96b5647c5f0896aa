"""The protocol's error type: a client fault with an HTTP status, a stable code, a message and a field path."""
from __future__ import annotations

from typing import Optional


class ProtocolError(Exception):
    """A client fault: ``status`` (4xx), ``code`` (stable, machine readable), message, field path."""

    def __init__(self, status: int, code: str, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def body(self) -> dict:
        return error_body(self.code, self.message, self.field)


def error_body(code: str, message: str, field: Optional[str] = None) -> dict:
    return {"error": code, "message": message, "field": field}


def invalid(field: str, message: str, status: int = 422, code: str = "invalid_field") -> ProtocolError:
    return ProtocolError(status, code, f"{field}: {message}", field)
