"""HTTP client for the Latent Edit server (protocol v1, docs/protocol.md), standard library only.

Bodies are msgpack (plugins/common/msgpack_codec.py); every request but ``GET /v1/health`` carries
the bearer token, re-read from the token file on each request so a
regenerated token is picked up. Proxies are bypassed: the server lives on loopback.

Errors a user can act on are :class:`ClientError` subclasses whose ``str()`` is the message to show.
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from .msgpack_codec import MsgpackError, packb, unpackb

MSGPACK = "application/msgpack"
DEFAULT_URL = "http://127.0.0.1:8765"
FINISHED_STATES = ("done", "succeeded", "finished", "completed")
FAILED_STATES = ("failed", "error", "interrupted")
CANCELLED_STATES = ("cancelled", "canceled")


class ClientError(Exception):
    """Base class: ``str(err)`` is a message fit for the user."""


class ServerNotRunning(ClientError):
    """Nothing answers at the server URL (connection refused, unknown host, timeout on connect)."""


class ServerTimeout(ClientError):
    """The server accepted the connection but did not answer in time."""


class Unauthorized(ClientError):
    """The token is missing, unreadable or rejected (HTTP 401/403)."""


class ServerError(ClientError):
    """The server answered with an error body ``{error, message, field}``."""

    def __init__(self, status: int, code: str, message: str, field=None):
        self.status, self.code, self.message, self.field = status, code, message, field
        text = message or code or ("HTTP %d" % status)
        super().__init__(text + (" [%s]" % field if field and field not in text else ""))


class JobFailed(ServerError):
    """A job ended in the failed state; ``code`` is the server's error code (e.g. ``no_face``)."""


class JobCancelled(ClientError):
    """A job ended because it was cancelled."""


def read_token(token_file) -> str:
    """The token stored in ``token_file`` (surrounding whitespace stripped)."""
    if not token_file:
        raise Unauthorized("No token file is set. Enter the server's token file in the Latent Edit dialog.")
    path = os.path.expanduser(str(token_file))
    try:
        with open(path, "r", encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        raise Unauthorized("The token file %s does not exist. Start the server once (it writes the file), "
                           "or correct the token file path." % path) from None
    except OSError as e:
        raise Unauthorized("Cannot read the token file %s: %s." % (path, e.strerror or e)) from None
    if not token:
        raise Unauthorized("The token file %s is empty." % path)
    return token


class Client:
    """One server: ``Client("http://127.0.0.1:8765", token_file="~/.latent-edit/token")``.

    ``token`` (a string) takes precedence over ``token_file``. ``timeout`` is the socket timeout in
    seconds for quick calls; ``upload_timeout`` for calls that carry or return whole layers.
    """

    def __init__(self, url: str = DEFAULT_URL, token_file=None, token=None, timeout: float = 10.0,
                 upload_timeout: float = 120.0):
        url = (url or DEFAULT_URL).strip().rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ClientError("The server URL %r is not an http:// address." % url)
        self.url = url
        self.token_file, self.token = token_file, token
        self.timeout, self.upload_timeout = timeout, upload_timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- transport ---

    def _token(self) -> str:
        return self.token if self.token else read_token(self.token_file)

    def request(self, method: str, path: str, body=None, auth: bool = True, timeout=None):
        """Send one request and return the decoded response body (dict / list / None)."""
        headers = {"Accept": MSGPACK}
        data = None
        if body is not None:
            data = packb(body)
            headers["Content-Type"] = MSGPACK
        if auth:
            headers["Authorization"] = "Bearer " + self._token()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                return _decode(resp.read(), resp.headers.get("Content-Type"))
        except urllib.error.HTTPError as e:
            raw = e.read() if e.fp is not None else b""
            raise _http_error(e.code, raw, e.headers.get("Content-Type") if e.headers else None) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, socket.timeout):
                raise ServerTimeout("The server at %s did not answer within %g s." % (self.url, timeout or self.timeout)) from None
            raise ServerNotRunning("The Latent Edit server is not running at %s (%s). Start it with the "
                                   "latent-edit-server command that install.py printed, or check the server URL."
                                   % (self.url, getattr(reason, "strerror", None) or reason)) from None
        except (socket.timeout, TimeoutError):
            raise ServerTimeout("The server at %s did not answer within %g s." % (self.url, timeout or self.timeout)) from None
        except ConnectionError as e:
            raise ServerNotRunning("The connection to %s was lost (%s)." % (self.url, e)) from None

    # --- endpoints ---

    def health(self) -> dict:
        """``GET /v1/health`` (no token needed): version, device, models, queue length."""
        return self.request("GET", "/v1/health", auth=False)

    def models(self) -> list:
        """``GET /v1/models`` -> list of model dicts (name, resolution, directions...)."""
        out = self.request("GET", "/v1/models")
        return out.get("models", []) if isinstance(out, dict) else list(out or [])

    def create_session(self, layer: dict, selection=None, model=None, method="pti", align="auto", options=None) -> dict:
        """``POST /v1/sessions`` -> ``{session_id, job_id}``; the inversion runs as a job."""
        body = {"layer": layer, "method": method, "align": align}
        if selection is not None:
            body["selection"] = selection
        if model:
            body["model"] = model
        if options:
            body["options"] = dict(options)
        return self.request("POST", "/v1/sessions", body, timeout=self.upload_timeout)

    def batch(self, items, model=None, method="pti", align="auto", options=None) -> dict:
        """``POST /v1/batch`` with ``items=[{layer, selection?}]`` -> ``{session_id(s), job_id}``."""
        body = {"items": [dict(i) for i in items], "method": method, "align": align}
        if model:
            body["model"] = model
        if options:
            body["options"] = dict(options)
        return self.request("POST", "/v1/batch", body, timeout=self.upload_timeout)

    def job(self, job_id: str, after=None, wait: float = 0.0) -> dict:
        """``GET /v1/jobs/{id}`` -> ``{state, progress, stage, message, version, ...}``; with ``after`` (a
        ``version``) and ``wait`` seconds it is a long poll answered at the job's next change."""
        path = "/v1/jobs/" + urllib.parse.quote(str(job_id), safe="")
        if after is not None and wait > 0:
            path += "?after=%d&wait=%g" % (int(after), wait)
            return self.request("GET", path, timeout=self.timeout + wait)
        return self.request("GET", path)

    def job_preview(self, job_id: str):
        """``GET /v1/jobs/{id}/preview``: the latest inversion preview as PNG bytes, or None (404: none yet)."""
        headers = {"Accept": "image/png", "Authorization": "Bearer " + self._token()}
        req = urllib.request.Request(self.url + "/v1/jobs/%s/preview" % urllib.parse.quote(str(job_id), safe=""),
                                     method="GET", headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raw = e.read() if e.fp is not None else b""
            raise _http_error(e.code, raw, e.headers.get("Content-Type") if e.headers else None) from None
        except (urllib.error.URLError, OSError):
            return None  # a preview is optional: the job's own polling reports a lost server

    def cancel(self, job_id: str) -> dict:
        """``DELETE /v1/jobs/{id}``: ask the server to stop the job (idempotent)."""
        return self.request("DELETE", "/v1/jobs/" + urllib.parse.quote(str(job_id), safe=""))

    def render(self, session_id: str, edits, feather=None, blend=None, format=None, fusion=None) -> dict:
        """``POST /v1/sessions/{id}/render`` with ``edits=[(direction, strength)]`` or dicts (``segments``:
        [index, ...] for an edit of some segments only) -> result body (``layer``, ``segments`` metadata)."""
        body = {"edits": [e if isinstance(e, dict) else {"direction": e[0], "strength": float(e[1])} for e in edits]}
        if fusion:
            body["fusion"] = fusion
        if feather is not None:
            body["feather"] = float(feather)
        if blend:
            body["blend"] = blend
        if format:
            body["format"] = format
        path = "/v1/sessions/%s/render" % urllib.parse.quote(str(session_id), safe="")
        return self.request("POST", path, body, timeout=self.upload_timeout)

    def wait_job(self, job_id: str, on_progress=None, should_cancel=None, poll_interval: float = 0.25,
                 timeout=None, long_poll: float = 0.5) -> dict:
        """Follow a job until it ends (for scripts and worker threads; never call on a UI thread).

        Servers that number job changes (``version``) are long-polled (``?after=&wait=long_poll``: an answer
        at each change, no sleeping); others are polled every ``poll_interval`` s. ``on_progress(job_dict)``
        is called after each answer; when ``should_cancel()`` turns true the job is cancelled on the server
        (checked at least every ``long_poll`` s). Returns the finished job; raises JobFailed / JobCancelled.
        """
        start = time.monotonic()
        cancel_sent = False
        version = None
        while True:
            if should_cancel is not None and should_cancel() and not cancel_sent:
                self.cancel(job_id)
                cancel_sent = True
            job = self.job(job_id, after=version, wait=long_poll)
            if on_progress is not None:
                on_progress(job)
            state = job_state(job)
            if state in FINISHED_STATES:
                return job
            check_job(job)
            if timeout is not None and time.monotonic() - start > timeout:
                raise ServerTimeout("Job %s did not finish within %g s." % (job_id, timeout))
            version = job.get("version") if isinstance(job.get("version"), int) else None
            if version is None:
                time.sleep(poll_interval)


def job_state(job: dict) -> str:
    return str((job or {}).get("state", "")).lower()


def check_job(job: dict) -> None:
    """Raise JobFailed / JobCancelled for a job dict in a failed / cancelled state."""
    state = job_state(job)
    if state in CANCELLED_STATES:
        raise JobCancelled("Cancelled.")
    if state == "interrupted" and not job.get("error"):
        raise JobFailed(0, "interrupted", "The server stopped while this job ran. Apply again.", None)
    if state in FAILED_STATES:
        err = job.get("error")
        if isinstance(err, dict):
            code, msg, field = err.get("error") or err.get("code") or "failed", err.get("message"), err.get("field")
        else:
            code, msg, field = str(err or job.get("code") or "failed"), job.get("message"), job.get("field")
        raise JobFailed(0, code, friendly_message(code, msg or "the job failed"), field)


def result_layers(body: dict) -> list:
    """The result layer maps of a render (or batch render) response, in input order."""
    if not isinstance(body, dict):
        raise ServerError(0, "bad_response", "The server's render answer is not a map.")
    if isinstance(body.get("layers"), list):
        return list(body["layers"])
    if isinstance(body.get("layer"), dict):
        return [body["layer"]]
    if isinstance(body.get("results"), list):
        return [r.get("layer", r) for r in body["results"]]
    raise ServerError(0, "bad_response", "The server's render answer holds no layer (keys: %s)." % ", ".join(body))


_NO_FACE = ("No face was found in the layer. Select a region with a clearly visible face, or switch face "
            "alignment off for a layer already cropped to the model's framing.")
_FRIENDLY = {
    "no_face": _NO_FACE,
    "unauthorized": "The server rejected the token. Check the token file path.",
    "missing_weights": "The server has no face-detector weights. Switch face alignment off, or install the "
                       "weights with install.py.",
}


def friendly_message(code: str, message: str) -> str:
    """The server's message, prefixed with advice for codes a user can act on.

    The engine reports a missing face as ``invalid_input`` "no face found ..." (core.align), so the
    message is matched too.
    """
    hint = _FRIENDLY.get(code)
    if hint is None and message and ("no face" in message.lower() or "contains no face" in message.lower()):
        hint = _NO_FACE
    if hint and message and message not in hint:
        return "%s (%s)" % (hint, message)
    return hint or message


def _decode(raw: bytes, content_type):
    if not raw:
        return None
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        if kind.endswith("json"):
            return json.loads(raw.decode("utf-8"))
        return unpackb(raw)
    except (MsgpackError, ValueError) as e:
        raise ServerError(0, "bad_response", "The server sent an unreadable %s body (%s)." % (kind or "untyped", e)) from None


def _http_error(status: int, raw: bytes, content_type) -> ClientError:
    try:
        body = _decode(raw, content_type)
    except ServerError:
        body = None
    if not isinstance(body, dict):
        body = {"message": raw[:300].decode("utf-8", "replace").strip() if raw else ""}
    code = str(body.get("error") or body.get("code") or "http_%d" % status)
    message = str(body.get("message") or "HTTP %d" % status)
    if status in (401, 403):
        return Unauthorized("The server rejected the token (%s). Check the token file path." % message)
    return ServerError(status, code, friendly_message(code, message), body.get("field"))
