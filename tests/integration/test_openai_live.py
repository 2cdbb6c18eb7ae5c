"""The official openai client against our /v1 routes on the real engine."""

import httpx
import openai
import pytest

from tests.integration.scrape import metric

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=server_url + "/v1", api_key="unused", timeout=180, max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def test_completion_matches_chat_greedy(client, model, server_url):
    prompt = "The capital of France is"
    done = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12
    # Same engine, same greedy decoding: /chat gives the same text.
    chat = httpx.post(
        server_url + "/chat",
        timeout=120,
        json={
            "prompt": prompt,
            "return_full_text": False,
            "generate_kwargs": {"do_sample": False, "max_new_tokens": 12},
        },
    ).json()
    assert done.choices[0].text == chat["Result"]


def test_chat_completion_and_its_stream_agree(client, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    done = client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0
    )
    reply = done.choices[0].message
    assert reply.role == "assistant" and "Paris" in reply.content
    pieces = []
    usage = None
    for chunk in client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
    assert "".join(pieces) == reply.content
    assert usage is not None and usage.completion_tokens == done.usage.completion_tokens


def test_errors_reach_the_client_as_openai_errors(client, model):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="x", max_tokens=-1)
    assert "max_tokens" in str(err.value)


def test_the_served_name_is_the_model_directorys_last_part(client, model, model_dir, server_url):
    """KAITO_SERVED_MODEL_NAME unset and KAITO_MODEL a directory: clients type the model's
    own name, not the path, and the path is not a second name for it."""
    assert model == model_dir.name == "SmolLM2-135M-Instruct"
    assert client.completions.create(model=model, prompt="Hi", max_tokens=1).usage
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=str(model_dir), prompt="Hi", max_tokens=1)
    # The engine's metrics carry the same name in their model_name label.
    assert metric(server_url, "vllm:request_success_total", {"model_name": model}) >= 1
    assert metric(server_url, "vllm:request_success_total", {"model_name": str(model_dir)}) == 0
