"""The base model's served name: what /v1/models lists, what clients send as `model`, and
the metrics' model_name label."""

from pathlib import Path

import pytest

from app.engines.vllm_engine import VLLMEngine
from app.settings import DEFAULT_MODEL_DIR, Settings, default_served_name


@pytest.mark.parametrize(
    ("model", "served"),
    [
        # A local directory: its last part, whatever the mount point.
        ("/root/.cache/kaito-chat/models/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
        ("/workspace/weights/Mistral-7B-v0.1/", "Mistral-7B-v0.1"),
        ("./models/tiny-mistral", "tiny-mistral"),
        ("../tiny-mistral", "tiny-mistral"),
        ("~/models/phi-3", "phi-3"),
        ("models/org/name", "name"),  # three parts: never a hub id
        # A hub id stays whole, as vLLM reports it and clients already know it.
        ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1"),
        ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
        ("gpt2", "gpt2"),
    ],
)
def test_default_served_name(model: str, served: str) -> None:
    assert default_served_name(model) == served


def test_a_directory_that_looks_like_a_hub_id_is_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers and vLLM load an existing directory before they ask the hub: the name
    follows what is loaded."""
    (tmp_path / "mistralai" / "Mistral-7B-v0.1").mkdir(parents=True)
    (tmp_path / "phi-3").mkdir()
    monkeypatch.chdir(tmp_path)
    assert default_served_name("mistralai/Mistral-7B-v0.1") == "Mistral-7B-v0.1"
    assert default_served_name("phi-3") == "phi-3"
    monkeypatch.chdir(tmp_path / "phi-3")
    assert default_served_name(".") == "phi-3"


def test_the_setting_wins_and_every_reader_uses_one_name() -> None:
    assert Settings().model_name == DEFAULT_MODEL_DIR.name == "SmolLM2-135M-Instruct"
    named = Settings(model="/opt/model", served_model_name="mistral-7b")
    assert named.model_name == "mistral-7b"
    # The engine's served name feeds its metrics' model_name label.
    assert VLLMEngine(named).engine_args(on_gpu=False)["served_model_name"] == "mistral-7b"
    default = VLLMEngine(Settings(model="/models/SmolLM2-135M-Instruct"))
    assert default.engine_args(on_gpu=False)["served_model_name"] == "SmolLM2-135M-Instruct"


def test_vllms_openai_server_gets_the_same_name() -> None:
    """vLLM's own argument parser (a real import): /v1/models and the `model` check."""
    from app.engines.vllm_openai import vllm_server_args

    args = vllm_server_args(Settings(model="/models/SmolLM2-135M-Instruct"))
    assert (args.model, args.served_model_name) == (
        "/models/SmolLM2-135M-Instruct",
        ["SmolLM2-135M-Instruct"],
    )
