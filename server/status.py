"""The small HTML status page at ``/``: recent jobs with state, progress bar and thumbnail."""
from __future__ import annotations

import datetime
import html

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
.bar{width:140px;height:10px;background:#eee;border-radius:5px;overflow:hidden}.bar div{height:100%;background:#4a8}
.failed,.interrupted{color:#b33}.cancelled{color:#888}.done{color:#282}.running{color:#25a}
img{max-width:64px;max-height:64px;background:repeating-conic-gradient(#ccc 0 25%,#fff 0 50%) 0 0/12px 12px}"""


def _when(ts) -> str:
    if not ts:
        return ""
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def status_page(jobs: list, counts: dict) -> str:
    """``jobs``: public job dicts (newest first); ``counts``: queue counts from the job manager."""
    rows = []
    for j in jobs:
        jid = html.escape(j["job_id"])
        err = j["error"]["message"] if j["error"] else ""
        rows.append(
            f"<tr><td><img src='/status/jobs/{jid}/preview.png' alt=''></td><td><code>{jid[:12]}</code></td>"
            f"<td>{html.escape(j['kind'])}</td><td class='{html.escape(j['state'])}'>{html.escape(j['state'])}</td>"
            f"<td><div class='bar'><div style='width:{100 * j['progress']:.0f}%'></div></div>"
            f"{100 * j['progress']:.0f}%</td><td>{html.escape(j['stage'])}</td>"
            f"<td>{html.escape(err or j['message'])}</td><td>{_when(j['created'])}</td></tr>")
    body = "".join(rows) or "<tr><td colspan=8>no jobs yet</td></tr>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>"
            f"<title>Latent Edit server</title><style>{STYLE}</style></head><body><h1>Latent Edit server</h1>"
            f"<p>{counts['running']} running, {counts['queued']} queued (max {counts['max_queued']}).</p>"
            f"<table><tr><th></th><th>job</th><th>kind</th><th>state</th><th>progress</th><th>stage</th>"
            f"<th>message</th><th>created</th></tr>{body}</table></body></html>")


def unauthorized_page() -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Latent Edit: token needed</title></head><body>"
            "<h1>Token needed</h1><p>Open <code>/?token=TOKEN</code> once, with TOKEN the contents of the server's "
            "token file (<code>DATA_DIR/token</code>). The server answers with a separate status-page credential, "
            "valid 12 hours, in a cookie (the token itself is never stored in the browser).</p></body></html>")
