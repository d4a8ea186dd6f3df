"""`cv-assets serve-reports`: the project reports over http, beside the Dagster UI.

Browsers refuse `file://` links from an http page, so `make ui` starts this server on
`storage.reports_base_url` (default http://127.0.0.1:3001) and project_report's `report`
metadata links there. It serves only `storage.reports_dir`, read-only.
"""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the stdlib's name)
        pass  # one line per request would drown `make ui`'s own output


def bind_address(base_url: str) -> tuple[str, int]:
    """(host, port) to listen on for `base_url` (http only)."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"storage.reports_base_url must be an http:// URL with a host, got {base_url!r}")
    return parts.hostname, parts.port or 80


def start_report_server(directory: Path, base_url: str) -> ThreadingHTTPServer:
    """Serve `directory` at `base_url` from a daemon thread; `shutdown()` stops it."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(bind_address(base_url), handler)
    threading.Thread(target=server.serve_forever, name="report-server", daemon=True).start()
    return server
