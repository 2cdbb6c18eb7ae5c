"""LoRA adapters on the real server: vLLM's multi-LoRA engine and the transformers backend
against PEFT + transformers, token for token (docs/ADAPTERS.md).

The adapters are made here, from the default model, with random non-zero weights (so
outputs really change); nothing is downloaded or committed. ONE server serves them all:
alpha and beta with Kaito's strengths in the environment variables named after them.
"""

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from app.adapters import COMBINED, build_combined, discover_adapters
from tests.conftest import ServerProcess, running

pytestmark = pytest.mark.integration

STRENGTHS = {"alpha": "0.7", "beta": "0.4"}
PROMPT = "The best way to learn a new language is"
NEW_TOKENS = 20


def make_adapter(
    model_dir: Path, out: Path, seed: int, r: int, scale: float, targets: list[str]
) -> None:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    # init_lora_weights=False: random A and B, so the adapter changes the output; the
    # scale (lora_alpha / r) keeps the change moderate (text stays text, greedy has no
    # near-ties) yet large enough to change the greedy tokens (checked below).
    config = LoraConfig(r=r, lora_alpha=r * scale, target_modules=targets, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)


@pytest.fixture(scope="session")
def adapters_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(model_dir, root / "alpha", 1, 8, 0.25, ["q_proj", "v_proj", "o_proj"])
    # k_proj and down_proj at 0.25 left the greedy tokens as the base model's: stronger.
    make_adapter(model_dir, root / "beta", 2, 16, 1.0, ["q_proj", "k_proj", "down_proj"])
    return root


@pytest.fixture(scope="session")
def lora_server(
    model_dir: Path, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("lora-server") / "server.log"
    args = ["--enforce-eager", "--model", str(model_dir), "--adapters-dir", str(adapters_dir)]
    # Plain beam search on the transformers backend: the same requests, both backends.
    args += ["--beam-backend", "hf"]
    # The comparisons read the replies' token ids and log-probs (output_scores).
    args += ["--output-scores"]
    yield from running(ServerProcess(args, log, env=STRENGTHS))


@pytest.fixture(scope="module")
def merged_server(
    model_dir: Path, adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The same adapters with per-request selection off: the combination merged in."""
    root = tmp_path_factory.mktemp("merged-server")
    args = ["--enforce-eager", "--model", str(model_dir), "--adapters-dir", str(adapters_dir)]
    args += ["--no-per-request-adapters", "--beam-backend", "hf", "--output-scores"]
    env = {**STRENGTHS, "XDG_CACHE_HOME": str(root / "cache")}
    yield from running(ServerProcess(args, root / "server.log", env=env))


@pytest.fixture(scope="module")
def peft_model(model_dir: Path, adapters_dir: Path) -> PeftModel:
    """The oracle: PEFT on the base model with both adapters and Kaito's combination."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapters_dir / "alpha"), adapter_name="alpha")
    model.load_adapter(str(adapters_dir / "beta"), adapter_name="beta")
    model.add_weighted_adapter(
        ["alpha", "beta"],
        [float(STRENGTHS["alpha"]), float(STRENGTHS["beta"])],
        adapter_name=COMBINED,
        combination_type="svd",
    )
    model.eval()
    return model


@pytest.fixture(scope="module")
def oracle(peft_model: PeftModel, hf_tokenizer) -> Callable[..., Any]:
    def generate(adapter: str | None, num_beams: int = 1, scores: bool = False) -> Any:
        ids = hf_tokenizer(PROMPT, return_tensors="pt").input_ids
        kwargs = {
            "output_scores": scores,
            "return_dict_in_generate": True,
            "attention_mask": torch.ones_like(ids),
            "do_sample": False,
            "num_beams": num_beams,
            "max_new_tokens": NEW_TOKENS,
            "pad_token_id": hf_tokenizer.eos_token_id,
        }
        with torch.no_grad():
            if adapter is None:
                with peft_model.disable_adapter():
                    out = peft_model.generate(input_ids=ids, **kwargs)
            else:
                peft_model.set_adapter(adapter)
                out = peft_model.generate(input_ids=ids, **kwargs)
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        if not scores:
            return tokens
        logprobs = [
            torch.log_softmax(step[0], dim=-1)[token].item()
            for step, token in zip(out.scores, tokens, strict=True)
        ]
        return tokens, logprobs

    return generate


def chat_ids(url: str, model: str | None, num_beams: int = 1) -> list[int]:
    payload = chat_payload(model, num_beams)
    r = httpx.post(url + "/chat", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    return token_ids(r.json(), num_beams)


def chat_payload(model: str | None, num_beams: int = 1) -> dict:
    kwargs = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "num_beams": num_beams}
    if num_beams == 1:
        kwargs["output_scores"] = True  # the reply then carries the token ids
    payload = {"prompt": PROMPT, "return_full_text": False, "generate_kwargs": kwargs}
    if model is not None:
        payload["model"] = model
    return payload


def token_ids(reply: dict, num_beams: int) -> list[int]:
    if num_beams == 1:
        return [t["id"] for t in reply["sequences"][0]["tokens"]]
    return reply["Result"]  # beams carry no scores: compared as text


def test_each_adapter_alone_matches_peft(lora_server, oracle):
    _, base = oracle(None, scores=True)
    for name in ("alpha", "beta"):
        expected, logprobs = oracle(name, scores=True)
        # The adapter changes the model: its tokens' log-probabilities move (beta's greedy
        # tokens stay the base model's on this prompt, alpha's change).
        assert max(abs(a - b) for a, b in zip(logprobs, base, strict=False)) > 0.01, name
        r = httpx.post(lora_server.url + "/chat", json=chat_payload(name), timeout=300)
        assert r.status_code == 200, r.text
        tokens = r.json()["sequences"][0]["tokens"]
        assert [t["id"] for t in tokens] == expected, name
        assert [t["logprob"] for t in tokens] == pytest.approx(logprobs, abs=1e-3), name


def test_the_default_is_kaitos_weighted_combination(lora_server, oracle):
    expected = oracle(COMBINED)
    assert expected != oracle(None)
    assert chat_ids(lora_server.url, None) == expected


def test_the_base_models_name_runs_no_adapter(lora_server, oracle, model_dir):
    # The served name defaults to KAITO_MODEL here (no KAITO_SERVED_MODEL_NAME).
    models = httpx.get(lora_server.url + "/v1/models", timeout=60).json()["data"]
    base_name = next(m["id"] for m in models if m.get("parent") is None)
    assert chat_ids(lora_server.url, base_name) == oracle(None)


def test_a_batch_of_requests_for_different_adapters_each_get_their_own(lora_server, oracle):
    models = [None, "alpha", "beta", "alpha", None, "beta"]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(
                *(client.post(lora_server.url + "/chat", json=chat_payload(m)) for m in models)
            )

    replies = asyncio.run(run())
    expected = {m: oracle(m if m is not None else COMBINED) for m in set(models)}
    for model, reply in zip(models, replies, strict=True):
        assert reply.status_code == 200, reply.text
        assert token_ids(reply.json(), 1) == expected[model], model


def test_the_transformers_backend_applies_the_same_adapters(lora_server, oracle, hf_tokenizer):
    prompt_ids = hf_tokenizer.encode(PROMPT)
    for model, adapter in (("alpha", "alpha"), (None, COMBINED)):
        r = httpx.post(
            lora_server.url + "/chat", json=chat_payload(model, num_beams=2), timeout=600
        )
        assert r.status_code == 200, r.text
        assert r.json()["backend"] == "hf"
        expected = oracle(adapter, num_beams=2)
        from app.pipeline_text import PipelineDecoder

        text = PipelineDecoder(hf_tokenizer, prompt_ids, clean_up=False).new_text(expected)
        assert r.json()["Result"] == text, model


def test_an_unknown_model_is_a_404_naming_it(lora_server):
    r = httpx.post(lora_server.url + "/chat", json=chat_payload("gamma"), timeout=60)
    assert r.status_code == 404, r.text
    assert "'gamma'" in r.json()["detail"] and r.json()["parameter"] == "model"
    r = httpx.post(
        lora_server.url + "/v1/completions",
        json={"model": "gamma", "prompt": PROMPT, "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 404, r.text
    assert "gamma" in r.json()["error"]["message"]


def test_openai_routes_select_adapters_by_model(lora_server, oracle, hf_tokenizer):
    models = httpx.get(lora_server.url + "/v1/models", timeout=60).json()["data"]
    base_name = next(m["id"] for m in models if m.get("parent") is None)
    adapters = {m["id"]: m["parent"] for m in models if m.get("parent") is not None}
    assert adapters == {"alpha": base_name, "beta": base_name}
    for model, adapter in (("beta", "beta"), (base_name, None)):
        r = httpx.post(
            lora_server.url + "/v1/completions",
            json={"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        expected = hf_tokenizer.decode(oracle(adapter), skip_special_tokens=True)
        assert r.json()["choices"][0]["text"] == expected, model


def test_metrics_count_requests_by_adapter(lora_server):
    httpx.post(lora_server.url + "/chat", json=chat_payload("alpha"), timeout=120)
    text = httpx.get(lora_server.url + "/metrics", timeout=60).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "vllm:lora_requests_info" in families
    by_adapter = {
        s.labels.get("adapter"): s.value
        for s in families["kaito_backend_requests"].samples
        if s.name == "kaito_backend_requests_total"
    }
    assert by_adapter.get("alpha", 0) >= 1
    assert any(name.startswith("combined-") for name in by_adapter)


def test_strength_zero_combines_into_no_change(model_dir, adapters_dir, tmp_path):
    """Kaito's strength 0 for every adapter: the combined adapter adds nothing."""
    from safetensors.torch import load_file

    found = discover_adapters(adapters_dir, {"alpha": "0", "beta": "0"})
    combined = build_combined(str(model_dir), found, "svd", tmp_path)
    weights = load_file(combined / "adapter_model.safetensors")
    assert weights and all(not w.any() for k, w in weights.items() if "lora_B" in k)
    config = json.loads((combined / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"] == str(model_dir)


def test_a_directory_without_adapter_config_stops_start_up(model_dir, tmp_path):
    (tmp_path / "adapters" / "half-copied").mkdir(parents=True)
    server = ServerProcess(
        ["--model", str(model_dir), "--adapters-dir", str(tmp_path / "adapters")],
        tmp_path / "server.log",
    )
    try:
        assert server.proc.wait(timeout=300) != 0
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "half-copied" in log and "adapter_config.json" in log


def test_the_merged_default_matches_peft_unmerged(merged_server, oracle, hf_tokenizer):
    expected, logprobs = oracle(COMBINED, scores=True)
    base_name = httpx.get(merged_server.url + "/v1/models", timeout=60).json()["data"][0]["id"]
    for model in (None, base_name):
        r = httpx.post(merged_server.url + "/chat", json=chat_payload(model), timeout=120)
        assert r.status_code == 200, r.text
        assert token_ids(r.json(), 1) == expected, model
        got = [t["logprob"] for t in r.json()["sequences"][0]["tokens"]]
        assert got == pytest.approx(logprobs, abs=2e-3), model
    # The transformers backend loads the same merged model.
    r = httpx.post(merged_server.url + "/chat", json=chat_payload(None, num_beams=2), timeout=600)
    assert r.status_code == 200, r.text
    assert r.json()["backend"] == "hf"
    from app.pipeline_text import PipelineDecoder

    prompt_ids = hf_tokenizer.encode(PROMPT)
    text = PipelineDecoder(hf_tokenizer, prompt_ids, clean_up=False).new_text(
        oracle(COMBINED, num_beams=2)
    )
    assert r.json()["Result"] == text


def test_the_merged_server_runs_no_lora(merged_server):
    models = httpx.get(merged_server.url + "/v1/models", timeout=60).json()["data"]
    assert [m.get("parent") for m in models] == [None]
    r = httpx.post(merged_server.url + "/chat", json=chat_payload("alpha"), timeout=60)
    assert r.status_code == 404, r.text
    assert "KAITO_PER_REQUEST_ADAPTERS=false" in r.json()["detail"]
    text = httpx.get(merged_server.url + "/metrics", timeout=60).text
    assert "vllm:lora_requests_info" not in text  # vLLM's LoRA manager is off
