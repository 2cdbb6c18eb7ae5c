"""Beam requests beside sampling requests on the real server, and the transformers queue.

- 8 beam-search requests and 8 sampling requests sent at once all complete correctly,
  and the sampling requests are not serialised behind the beams: every one finishes
  before the last beam request does.
- Group beam search (the transformers backend) queues FIFO, shows its queue in /metrics,
  counts in kaito_backend_requests_total{backend="hf"}, and a client that goes away
  takes its request out of the queue.
"""

import asyncio
import time

import httpx
import pytest
import torch

from bench.workload import continuation_prompts
from tests.integration.scrape import metric

pytestmark = pytest.mark.integration

PROMPTS = continuation_prompts()[:8]
BEAM = {"do_sample": False, "num_beams": 4, "max_new_tokens": 12, "output_scores": True}
SAMPLE = {"do_sample": True, "top_k": 20, "max_new_tokens": 12}
GROUP = {
    "do_sample": False,
    "num_beams": 4,
    "num_beam_groups": 2,
    "diversity_penalty": 1.0,
    "max_new_tokens": 8,
}


def beam_reference(hf_model, hf_tokenizer, prompt: str) -> list[int]:
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=4,
            max_new_tokens=12,
            eos_token_id=[hf_tokenizer.eos_token_id],
            pad_token_id=hf_tokenizer.pad_token_id,
            return_dict_in_generate=True,
        )
    n = int((out.beam_indices[0] >= 0).sum())
    return out.sequences[0, ids.shape[1] :].tolist()[:n]


def test_sampling_is_not_serialised_behind_beams(server_url, hf_model, hf_tokenizer):
    async def run() -> list[tuple[str, str, float, dict]]:
        t0 = time.perf_counter()

        async def one(
            http: httpx.AsyncClient, kind: str, prompt: str
        ) -> tuple[str, str, float, dict]:
            kwargs = BEAM if kind == "beam" else SAMPLE
            r = await http.post(
                server_url + "/chat",
                json={"prompt": prompt, "return_full_text": False, "generate_kwargs": kwargs},
            )
            assert r.status_code == 200, r.text
            return kind, prompt, time.perf_counter() - t0, r.json()

        async with httpx.AsyncClient(timeout=900) as http:
            jobs = [one(http, "beam", p) for p in PROMPTS] + [
                one(http, "sample", p) for p in PROMPTS
            ]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    beams = [r for r in results if r[0] == "beam"]
    samples = [r for r in results if r[0] == "sample"]
    for _, prompt, _, reply in beams:
        got = [t["id"] for t in reply["sequences"][0]["tokens"]]
        assert got == beam_reference(hf_model, hf_tokenizer, prompt), prompt
    for _, _, _, reply in samples:
        assert reply["backend"] == "vllm" and len(reply["sequences"]) == 1
        assert 1 <= reply["sequences"][0]["generated_tokens"] <= 12
    last_beam = max(t for _, _, t, _ in beams)
    last_sample = max(t for _, _, t, _ in samples)
    assert last_sample < last_beam, (last_sample, last_beam)


def test_transformers_queue_metrics_and_counts(server_url):
    before = metric(server_url, "kaito_backend_requests_total", {"backend": "hf"})
    depths: list[float] = []

    async def run() -> list[dict]:
        async def poll() -> None:
            while True:
                depths.append(await asyncio.to_thread(metric, server_url, "kaito_hf_queue_depth"))
                await asyncio.sleep(0.2)

        async with httpx.AsyncClient(timeout=900) as http:
            poller = asyncio.create_task(poll())
            try:
                replies = await asyncio.gather(
                    *(
                        http.post(
                            server_url + "/chat",
                            # Settings differ, so the backend does not batch them: they queue.
                            json={
                                "prompt": p,
                                "generate_kwargs": {**GROUP, "max_new_tokens": 8 + i},
                                "return_full_text": False,
                            },
                        )
                        for i, p in enumerate(PROMPTS[:3])
                    )
                )
            finally:
                poller.cancel()
            return [r.json() for r in replies]

    replies = asyncio.run(run())
    assert all(r["backend"] == "hf" for r in replies)
    assert metric(server_url, "kaito_backend_requests_total", {"backend": "hf"}) == before + 3
    assert max(depths) >= 1  # the second and third waited in the queue
    assert metric(server_url, "kaito_hf_queue_depth") == 0
    assert metric(server_url, "kaito_hf_running") == 0


def test_a_client_that_goes_away_leaves_the_transformers_queue(server_url):
    before = metric(server_url, "kaito_backend_requests_total", {"backend": "hf"})

    async def run() -> None:
        async with httpx.AsyncClient(timeout=900) as http:
            # A longer first request, so the second surely waits behind it.
            long_group = {**GROUP, "max_new_tokens": 24}
            first = asyncio.create_task(
                http.post(
                    server_url + "/chat", json={"prompt": PROMPTS[0], "generate_kwargs": long_group}
                )
            )
            # Wait until the first runs, then queue a second and hang up on it.
            for _ in range(600):
                if metric(server_url, "kaito_hf_running") == 1:
                    break
                await asyncio.sleep(0.1)
            second = asyncio.create_task(
                http.post(
                    server_url + "/chat", json={"prompt": PROMPTS[1], "generate_kwargs": GROUP}
                )
            )
            for _ in range(100):
                if metric(server_url, "kaito_hf_queue_depth") == 1:
                    break
                await asyncio.sleep(0.05)
            assert metric(server_url, "kaito_hf_queue_depth") == 1
            second.cancel()  # closes the connection: the server sees a disconnect
            await asyncio.gather(second, return_exceptions=True)
            for _ in range(100):
                if metric(server_url, "kaito_hf_queue_depth") == 0:
                    break
                await asyncio.sleep(0.05)
            assert metric(server_url, "kaito_hf_queue_depth") == 0
            assert (await first).status_code == 200

    asyncio.run(run())
    # Only the first was served.
    assert metric(server_url, "kaito_backend_requests_total", {"backend": "hf"}) == before + 1
