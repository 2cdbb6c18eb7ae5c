"""An OTLP/HTTP trace sink for benchmarks: accepts every export and keeps only a count.

Tracing's cost to the server is building spans and the exporter's serialisation and POSTs
in its background thread; what a collector then does with the spans happens elsewhere.
This sink answers as a collector does (200 with an empty ExportTraceServiceResponse, which
encodes to no bytes) so the traced server pays all of its own cost and nothing more.
"""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's method name)
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        self.server.exports += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per export would drown the bench's output


class OTLPSink:
    """A sink on a free loopback port, in a daemon thread, until ``stop``."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.exports = 0  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def exports(self) -> int:
        return int(self._server.exports)  # type: ignore[attr-defined]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
