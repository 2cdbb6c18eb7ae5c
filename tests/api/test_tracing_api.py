"""Traces over OTLP/HTTP (KAITO_OTLP_TRACES_PROTOCOL=http/protobuf) with the fake engine:
a receiver here decodes the real protobuf bodies the exporter posts. The engine records
the trace headers it is handed, which must name our `generate` span. (OTLP/gRPC and vLLM's
own span: tests/integration/test_tracing_live.py.)

Runs in a subprocess: a tracer provider is process-wide and cannot be replaced, and the
rest of the session must run with tracing off.
"""

import json
import subprocess
import sys
from pathlib import Path

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"

SCRIPT = """
import json, threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from transformers import AutoTokenizer

from app import tracing
from app.server import create_app
from app.settings import DEFAULT_MODEL_DIR, Settings
from tests.api.conftest import FakeEngine

bodies = []

class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        assert self.path == "/v1/traces", self.path
        assert self.headers["Content-Type"] == "application/x-protobuf"
        bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", 0), Receiver)
threading.Thread(target=server.serve_forever, daemon=True).start()

class HeaderRecordingEngine(FakeEngine):
    headers = []

    async def generate(self, request):
        self.headers.append(tracing.trace_headers())
        return await super().generate(request)

engine = HeaderRecordingEngine(AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR))
settings = Settings(
    otlp_traces_endpoint=f"http://127.0.0.1:{server.server_port}/v1/traces",
    otlp_traces_protocol="http/protobuf",
)
with TestClient(create_app(settings, engine=engine)) as client:
    reply = client.post(
        "/chat",
        json={"prompt": "The capital of France is", "generate_kwargs": {"max_new_tokens": 4}},
        headers={"traceparent": "00-TRACE-CALLER-01", "X-Request-Id": "api-trace-1"},
    )
    assert reply.status_code == 200, reply.text
# Leaving the client ran the lifespan's shutdown, which flushes the exporter.
spans = []
for body in bodies:
    for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append({
                    "name": s.name, "trace": s.trace_id.hex(), "id": s.span_id.hex(),
                    "parent": s.parent_span_id.hex(),
                    "attributes": {a.key: str(a.value) for a in s.attributes},
                })
print(json.dumps({"spans": spans, "headers": engine.headers}))
"""


def test_http_protobuf_export_and_the_headers_the_engine_gets() -> None:
    script = SCRIPT.replace("TRACE", TRACE_ID).replace("CALLER", CALLER_SPAN)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    spans = {s["name"]: s for s in out["spans"]}
    assert set(spans) == {"POST /chat", "admission", "tokenize", "validate_and_map", "generate",
                          "decode"}  # fmt: skip
    root = spans["POST /chat"]
    assert {s["trace"] for s in spans.values()} == {TRACE_ID}
    assert root["parent"] == CALLER_SPAN
    assert 'string_value: "api-trace-1"' in root["attributes"]["request.id"]
    for name, span in spans.items():
        if name != "POST /chat":
            assert span["parent"] == root["id"], name
    # The engine was handed the generate span's context: vLLM's span hangs under it.
    (headers,) = out["headers"]
    assert headers["traceparent"] == f"00-{TRACE_ID}-{spans['generate']['id']}-01"
