"""A JSON-over-HTTP server on 127.0.0.1 for tests of clients (the LLM judge, web search)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalJSONServer:
    """Answers every POST with `respond(request) -> (status, payload)`, where request is
    {"path", "headers", "body"} (body parsed as JSON) and payload a JSON value, or a str sent as
    is. Every POST is recorded in `requests`. A GET of `.../models` lists `models` the way an
    OpenAI-compatible server does (metis's preflight asks it; not recorded). Use as a context
    manager."""

    def __init__(self, respond: Callable[[dict], tuple[int, object]], models: list[str] | None = None):
        self.requests: list[dict] = []
        self.models = list(models or [])
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if not self.path.rstrip("/").endswith("/models"):
                    self.send_error(404)
                    return
                listing = {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]}
                data = json.dumps(listing).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                request = {"path": self.path, "headers": dict(self.headers), "body": body}
                server.requests.append(request)
                status, payload = respond(request)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def scripted(script: list[tuple]) -> Callable[[dict], tuple[int, object]]:
    """A `respond` that answers from a script of (status, payload) pairs; the last one repeats."""
    script = list(script)
    return lambda request: script.pop(0) if len(script) > 1 else script[0]
