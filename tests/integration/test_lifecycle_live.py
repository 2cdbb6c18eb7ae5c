"""Servers of their own (they are overloaded, drained or killed, or serve a model whose
generation_config.json must be ignored): admission under a burst, the generation config,
SIGTERM while requests run, and the death of the engine process."""

import asyncio
import json
import signal
import time

import httpx
import psutil
import pytest
import torch

from tests.conftest import ServerProcess, running
from tests.integration.scrape import metric

pytestmark = pytest.mark.integration

ADMIT = 3


def post_many(url: str, n: int, new_tokens: int) -> list[httpx.Response | Exception]:
    payload = {
        "prompt": "Count slowly:",
        "generate_kwargs": {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens},
    }

    async def run() -> list[httpx.Response | Exception]:
        async with httpx.AsyncClient(
            timeout=300, limits=httpx.Limits(max_connections=100)
        ) as client:
            return await asyncio.gather(
                *(client.post(url + "/chat", json=payload) for _ in range(n)),
                return_exceptions=True,
            )

    return asyncio.run(run())


GREEDY_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def hostile_model(model_dir, tmp_path_factory, hf_model, hf_tokenizer):
    """The default model with a generation_config.json that would change /chat's replies
    if it were applied (Kaito's request defaults must always win), and the reference
    greedy ids from transformers on the untouched model."""
    ids = hf_tokenizer(GREEDY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=24,
            pad_token_id=hf_tokenizer.eos_token_id,
        )
    reference = out[0, ids.shape[1] :].tolist()
    copy = tmp_path_factory.mktemp("hostile-generation-config")
    for f in model_dir.iterdir():
        if f.name != "generation_config.json":
            (copy / f.name).symlink_to(f)
    (copy / "generation_config.json").write_text(
        json.dumps(
            {
                # The third reference token as an extra EOS: applying it would end greedy early.
                "eos_token_id": [hf_tokenizer.eos_token_id, reference[2]],
                "bos_token_id": hf_tokenizer.bos_token_id,
                "do_sample": True,
                "temperature": 0.01,
                "top_k": 1,
                "top_p": 0.1,
                "repetition_penalty": 2.0,
                "max_new_tokens": 3,
                "max_length": 8,
            }
        )
    )
    return copy, reference


@pytest.fixture(scope="module")
def small_server(hostile_model, tmp_path_factory):
    server = ServerProcess(
        [
            "--enforce-eager",
            "--output-scores",
            "--model",
            str(hostile_model[0]),
            "--max-model-len",
            "512",
            "--max-concurrent-requests",
            str(ADMIT),
            "--shutdown-grace-seconds",
            "120",
        ],
        tmp_path_factory.mktemp("small") / "server.log",
    )
    yield from running(server)


def test_burst_past_the_admission_limit(small_server):
    replies = post_many(small_server.url, 10 * ADMIT, new_tokens=12)
    statuses = [r.status_code for r in replies if isinstance(r, httpx.Response)]
    assert len(statuses) == 10 * ADMIT, [r for r in replies if not isinstance(r, httpx.Response)]
    assert statuses.count(429) > 0
    assert statuses.count(200) >= ADMIT
    assert set(statuses) <= {200, 429}
    for r in replies:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 12  # a full result
        else:
            assert r.headers["retry-after"] == "1"
    assert httpx.get(small_server.url + "/health").status_code == 200


def test_the_models_generation_config_never_overrides_a_request(small_server, hostile_model):
    reference = hostile_model[1]
    r = httpx.post(
        small_server.url + "/chat",
        timeout=120,
        json={
            "prompt": GREEDY_PROMPT,
            "return_full_text": False,
            "generate_kwargs": {"do_sample": False, "max_new_tokens": 24, "output_scores": True},
        },
    )
    assert r.status_code == 200, r.text
    # Not cut at the file's extra EOS or max_new_tokens, no repetition penalty 2.0.
    assert [t["id"] for t in r.json()["sequences"][0]["tokens"]] == reference
    # Kaito's sampling defaults (top_k 10, temperature 1), not the file's near-greedy ones.
    r = httpx.post(
        small_server.url + "/chat",
        timeout=120,
        json={
            "prompt": GREEDY_PROMPT,
            "generate_kwargs": {"num_return_sequences": 4, "max_new_tokens": 16},
        },
    )
    assert r.status_code == 200, r.text
    assert len({s["text"] for s in r.json()["sequences"]}) > 1


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(small_server):
    # Long enough to be still generating while the server drains, on a fast machine too
    # (64 tokens once finished before the signal landed, and the drain ended at once).
    new_tokens = 300

    async def scenario() -> tuple[list[httpx.Response], int, int]:
        payload = {
            "prompt": "Tell a story:",
            "generate_kwargs": {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens},
        }
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [
                asyncio.create_task(client.post(small_server.url + "/chat", json=payload))
                for _ in range(ADMIT)
            ]
            deadline = time.monotonic() + 60
            while (
                await asyncio.to_thread(metric, small_server.url, "vllm:num_requests_running")
                < ADMIT
            ):
                assert time.monotonic() < deadline, "the requests never all ran"
                await asyncio.sleep(0.1)
            small_server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            health = (await client.get(small_server.url + "/health")).status_code
            late = (await client.post(small_server.url + "/chat", json=payload)).status_code
            return list(await asyncio.gather(*tasks)), health, late

    replies, health, late = asyncio.run(scenario())
    assert health == 503 and late == 503  # draining: not ready, admits nothing new
    assert [r.status_code for r in replies] == [200] * ADMIT
    assert all(r.json()["usage"]["completion_tokens"] == new_tokens for r in replies)
    assert small_server.proc.wait(timeout=60) == 0


def test_engine_death_turns_health_503_and_exits_non_zero(model_dir, tmp_path):
    server = ServerProcess(
        ["--enforce-eager", "--model", str(model_dir), "--max-model-len", "512"],
        tmp_path / "server.log",
    )
    try:
        server.wait_healthy()
        engines = [
            p
            for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
        ]
        assert engines, "no engine core process found"

        async def in_flight_then_kill() -> tuple[httpx.Response | Exception, float]:
            async with httpx.AsyncClient(timeout=60) as client:
                pending = asyncio.create_task(
                    client.post(
                        server.url + "/chat",
                        json={
                            "prompt": "Go on:",
                            "generate_kwargs": {"max_new_tokens": 300, "min_new_tokens": 300},
                        },
                    )
                )
                await asyncio.sleep(2)
                for p in engines:
                    p.kill()
                killed = time.monotonic()
                while time.monotonic() - killed < 10:
                    try:
                        if (await client.get(server.url + "/health")).status_code == 503:
                            break
                    except httpx.HTTPError:
                        break  # already gone: not healthy either
                    await asyncio.sleep(0.1)
                unhealthy_after = time.monotonic() - killed
                reply = (await asyncio.gather(pending, return_exceptions=True))[0]
                return reply, unhealthy_after

        reply, unhealthy_after = asyncio.run(in_flight_then_kill())
        assert unhealthy_after < 5
        # The in-flight request gets a 503 rather than hanging (or the connection closes
        # as the process exits: either way it does not wait out its generation).
        if isinstance(reply, httpx.Response):
            assert reply.status_code == 503, reply.text
        assert server.proc.wait(timeout=60) != 0
    finally:
        server.stop()
