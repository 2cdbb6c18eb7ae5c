"""Traces, end to end: the real server (vLLM engine, default model) with tracing on exports
over OTLP/gRPC to a receiver run here, which decodes the real protocol
(opentelemetry-proto's ExportTraceServiceRequest). One trace holds our request span, its
stages and vLLM's own `llm_request` span, under the trace id the caller sent in its W3C
`traceparent`; prompts and outputs appear nowhere in what was exported.

Starts its own server (tracing is a start-up setting): one more engine start-up (~90 s).
"""

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status as StatusProto

from tests.conftest import ServerProcess, running

pytestmark = pytest.mark.integration

WAIT_S = 60
CALLER_SPAN = "00f067aa0ba902b7"
CHAT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
V1_TRACE = "5c0a41e7d8b94f2e9a1b3c4d5e6f7a80"
BAD_TRACE = "6d1b52f8e9ca4a3fab2c4d5e6f7a8b91"
PROMPT = "Once upon a time in a quiet harbour village"
STAGES = {"admission", "tokenize", "validate_and_map", "generate", "decode"}


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    scope: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int
    status_message: str


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()

    def Export(  # noqa: N802 (the gRPC method's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            scope=ss.scope.name,
                            attributes={kv.key: _value(kv.value) for kv in s.attributes},
                            resource=resource,
                            status_code=s.status.code,
                            status_message=s.status.message,
                        )
                    )
        with self._lock:
            self.spans += got
            self.requests += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    receiver = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(grace=None)


@pytest.fixture(scope="module")
def traced_server(
    receiver: tuple[Receiver, int], model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    _, port = receiver
    env = {
        "KAITO_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}",
        # The exporter batches for 5 s by default; the test need not wait that long.
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    log = tmp_path_factory.mktemp("traced") / "server.log"
    server = ServerProcess(["--enforce-eager", "--model", str(model_dir)], log, env=env)
    yield from running(server)


def wait_for(receiver: Receiver, trace_id: str, names: set[str]) -> list[ReceivedSpan]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        spans = receiver.trace(trace_id)
        if names <= {s.name for s in spans}:
            return spans
        time.sleep(0.2)
    got = sorted(s.name for s in receiver.trace(trace_id))
    pytest.fail(f"trace {trace_id}: wanted spans {sorted(names)} within {WAIT_S}s, got {got}")


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"expected one {name!r} span, got {len(found)}"
    return found[0]


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-{CALLER_SPAN}-01"


def test_chat_trace_holds_our_stages_and_the_engines_span(
    traced_server: ServerProcess, receiver: tuple[Receiver, int]
) -> None:
    rec, _ = receiver
    reply = httpx.post(
        traced_server.url + "/chat",
        json={"prompt": PROMPT, "generate_kwargs": {"max_new_tokens": 12, "do_sample": False}},
        headers={"traceparent": traceparent(CHAT_TRACE), "X-Request-Id": "trace-chat-1"},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    spans = wait_for(rec, CHAT_TRACE, {"POST /chat", "llm_request", *STAGES})

    root = one(spans, "POST /chat")
    # The caller's trace continued: its span is our root's parent.
    assert root.parent_id == CALLER_SPAN
    assert root.kind == SpanProto.SPAN_KIND_SERVER
    assert root.attributes["request.id"] == "trace-chat-1"
    assert root.attributes["http.response.status_code"] == 200
    assert root.resource["service.name"] == "kaito-chat"
    for name in STAGES:
        stage = one(spans, name)
        assert stage.parent_id == root.span_id, name
        assert root.start_ns <= stage.start_ns <= stage.end_ns <= root.end_ns, name
    assert one(spans, "tokenize").attributes["gen_ai.usage.prompt_tokens"] > 0

    # vLLM's own span, made by the engine from the headers we handed it, under our
    # generation stage.
    engine = one(spans, "llm_request")
    generate = one(spans, "generate")
    assert engine.scope.startswith("vllm"), engine.scope
    assert engine.parent_id == generate.span_id
    assert engine.attributes["gen_ai.request.id"].startswith("chat-trace-chat-1-")
    assert engine.attributes["gen_ai.request.id"] == generate.attributes["gen_ai.request.id"]
    usage = reply.json()["usage"]
    assert engine.attributes["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
    assert engine.attributes["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert "gen_ai.latency.time_in_queue" in engine.attributes

    # Never the prompt or the output, anywhere in what was exported.
    generated = reply.json()["Result"][len(PROMPT) :].strip()
    assert len(generated) > 3, reply.json()
    for s in rec.spans:
        text = repr(s.attributes) + repr(s.resource) + s.name
        assert "harbour village" not in text, s
        assert generated not in text, s


def test_v1_trace_holds_our_span_and_the_engines(
    traced_server: ServerProcess, receiver: tuple[Receiver, int]
) -> None:
    rec, _ = receiver
    reply = httpx.post(
        traced_server.url + "/v1/completions",
        json={"model": str(traced_server_model(traced_server)), "prompt": PROMPT, "max_tokens": 8},
        headers={"traceparent": traceparent(V1_TRACE), "X-Request-Id": "trace-v1-1"},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    spans = wait_for(rec, V1_TRACE, {"POST /v1/completions", "llm_request", "admission"})
    root = one(spans, "POST /v1/completions")
    assert root.parent_id == CALLER_SPAN
    assert root.attributes["request.id"] == "trace-v1-1"
    assert one(spans, "admission").parent_id == root.span_id
    assert one(spans, "generate").parent_id == root.span_id
    # vLLM's OpenAI layer passed the request's traceparent on, which is our span's.
    engine = one(spans, "llm_request")
    assert engine.parent_id == root.span_id
    assert "trace-v1-1" in engine.attributes["gen_ai.request.id"]


def test_a_request_without_traceparent_starts_a_trace_and_probes_make_none(
    traced_server: ServerProcess, receiver: tuple[Receiver, int]
) -> None:
    rec, _ = receiver
    for path in ("/health", "/metrics", "/livez"):
        assert httpx.get(traced_server.url + path, timeout=10).status_code == 200
    reply = httpx.post(
        traced_server.url + "/chat",
        json={"prompt": PROMPT, "generate_kwargs": {"max_new_tokens": 4}},
        headers={"X-Request-Id": "trace-new-1"},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    deadline = time.monotonic() + WAIT_S
    root = None
    while root is None and time.monotonic() < deadline:
        roots = [s for s in list(rec.spans) if s.attributes.get("request.id") == "trace-new-1"]
        root = roots[0] if roots else None
        time.sleep(0.2)
    assert root is not None, "no span for the request without traceparent"
    assert root.parent_id == ""  # a new trace, rooted here
    spans = wait_for(rec, root.trace_id, {"llm_request"})
    assert one(spans, "llm_request").parent_id == one(spans, "generate").span_id
    # Probes and scrapes are not traced.
    assert not [s for s in rec.spans if s.name.startswith("GET ")]


def traced_server_model(server: ServerProcess) -> str:
    models = httpx.get(server.url + "/v1/models", timeout=30).json()
    return str(models["data"][0]["id"])


def test_a_refused_request_shows_the_failing_stage_without_its_message(
    traced_server: ServerProcess, receiver: tuple[Receiver, int]
) -> None:
    rec, _ = receiver
    reply = httpx.post(
        traced_server.url + "/chat",
        json={"prompt": PROMPT, "generate_kwargs": {"do_sample": True, "top_p": 1.5}},
        headers={"traceparent": traceparent(BAD_TRACE), "X-Request-Id": "trace-bad-1"},
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    spans = wait_for(rec, BAD_TRACE, {"POST /chat", "validate_and_map"})
    assert one(spans, "POST /chat").attributes["http.response.status_code"] == 400
    stage = one(spans, "validate_and_map")
    assert stage.status_code == StatusProto.STATUS_CODE_ERROR
    # The exception's type, never its message (a message may quote the request).
    assert stage.status_message == stage.attributes["error.type"] != ""
    assert "1.5" not in repr(stage.attributes) + stage.status_message
    assert not {"generate", "llm_request"} & {s.name for s in spans}
