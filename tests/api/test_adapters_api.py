"""/chat's ``model`` field with a fake engine that serves two adapters: which adapter
reaches the engine, the 404 for an unknown name, the metrics label."""

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.adapters import Adapter, ServedAdapters
from app.server import create_app
from app.settings import Settings

SERVED = ServedAdapters(
    (Adapter("alpha", Path("/a/alpha"), 8, 0.5), Adapter("beta", Path("/a/beta"), 16, 1.0)),
    "svd",
    Path("/tmp/kaito-adapters/combined-0123abcd"),
)


def client_with_adapters(engine) -> TestClient:
    engine.adapters = SERVED
    return TestClient(create_app(Settings(served_model_name="base-llm"), engine=engine))


def ask(c: TestClient, **extra):
    return c.post("/chat", json={"prompt": "Hi", "generate_kwargs": {"max_new_tokens": 2}, **extra})


def test_model_selects_the_adapter_the_engine_runs(engine):
    with client_with_adapters(engine) as c:
        assert ask(c).status_code == 200
        assert engine.last.adapter == "combined-0123abcd"  # Kaito's combination
        assert ask(c, model="beta").status_code == 200
        assert engine.last.adapter == "beta"
        assert ask(c, model="base-llm").status_code == 200
        assert engine.last.adapter is None
        assert ask(c, model=None).status_code == 200
        assert engine.last.adapter == "combined-0123abcd"


def test_an_unknown_model_is_a_404_naming_it_and_the_known_ones(engine):
    with client_with_adapters(engine) as c:
        r = ask(c, model="Beta")
        assert r.status_code == 404
        body = r.json()
        assert body["parameter"] == "model"
        assert "'Beta'" in body["detail"] and "'beta'" in body["detail"]
        assert "'base-llm'" in body["detail"]
        assert not engine.requests


def test_without_adapters_only_the_base_name_is_known(client, engine):
    assert ask(client).status_code == 200
    assert engine.last.adapter is None
    assert ask(client, model="alpha").status_code == 404


def test_requests_are_counted_by_adapter(engine):
    with client_with_adapters(engine) as c:
        ask(c, model="alpha")
        text = c.get("/metrics").text
    counted = {
        s.labels["adapter"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "kaito_backend_requests_total" and s.value > 0
    }
    assert "alpha" in counted


def test_a_merged_adapter_cannot_be_picked_alone(engine):
    """KAITO_PER_REQUEST_ADAPTERS=false: the engine serves the merged weights, no adapters."""
    engine.merged_adapters = ("alpha", "beta")
    with TestClient(create_app(Settings(served_model_name="base-llm"), engine=engine)) as c:
        assert ask(c).status_code == 200
        assert ask(c, model="base-llm").status_code == 200
        assert engine.last.adapter is None
        r = ask(c, model="beta")
        assert r.status_code == 404
        assert r.json()["parameter"] == "model"
        assert "KAITO_PER_REQUEST_ADAPTERS=false" in r.json()["detail"]
