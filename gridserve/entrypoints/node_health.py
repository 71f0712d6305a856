"""The small HTTP server of a node other than node 0: GET /health answers 200 while all of the node's ranks are
alive and node 0 answers its heartbeats, else 503 with the reason; every other route is 404. (SGLang's
equivalent answers 200 always.)"""

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def start_health_server(host: str, port: int, why_unhealthy: Callable[[], str | None]) -> ThreadingHTTPServer:
    """Serves /health on host:port in a daemon thread; why_unhealthy() returns None when healthy."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            if self.path.split("?")[0] != "/health":
                return self._reply(404, {"error": f"{self.path}: not found (this node serves only /health)"})
            reason = why_unhealthy()
            self._reply(200, {"status": "ok"}) if reason is None else self._reply(503, {"error": reason})

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # health probes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="gridserve-node-health", daemon=True).start()
    return server
