"""Clients that go away: their engine requests are aborted and the slots freed."""

import asyncio
import time

import httpx
import pytest

from tests.integration.scrape import metric

pytestmark = pytest.mark.integration


def test_disconnected_clients_free_the_engine(server_url):
    payload = {
        "prompt": "Write a very long essay about the sea.",
        "generate_kwargs": {"max_new_tokens": 400, "min_new_tokens": 400},
    }

    async def start_and_drop() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [
                asyncio.create_task(client.post(server_url + "/chat", json=payload))
                for _ in range(8)
            ]
            deadline = time.monotonic() + 60
            while (
                metric(server_url, "vllm:num_requests_running") < 8 and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.2)
            for task in tasks:  # the clients close their connections
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(start_and_drop())
    dropped_at = time.monotonic()
    while time.monotonic() - dropped_at < 5:
        if (
            metric(server_url, "vllm:num_requests_running") == 0
            and metric(server_url, "kaito_requests_in_flight") == 0
        ):
            break
        time.sleep(0.1)
    freed_after = time.monotonic() - dropped_at
    assert metric(server_url, "vllm:num_requests_running") == 0
    assert metric(server_url, "kaito_requests_in_flight") == 0
    assert freed_after < 1.0, f"engine slots freed after {freed_after:.2f}s"
