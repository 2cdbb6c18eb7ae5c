"""Adapter discovery and its start-up checks (app/adapters.py): pure, on tmp directories."""

import json
from pathlib import Path

import pytest

from app.adapters import (
    NO_ADAPTERS,
    VLLM_LORA_RANKS,
    AdapterError,
    ServedAdapters,
    UnknownModel,
    active_adapter,
    combined_rank,
    discover_adapters,
    select_adapter,
    vllm_max_lora_rank,
)


def make_adapter(root: Path, name: str, r: int = 8, **config: object) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, **config}))
    return path


def test_a_missing_directory_means_the_base_model(tmp_path: Path) -> None:
    assert discover_adapters(tmp_path / "absent", {}) == []


def test_adapters_are_named_after_their_directory_with_kaitos_strength(tmp_path: Path) -> None:
    make_adapter(tmp_path, "beta", r=16)
    make_adapter(tmp_path, "alpha")
    (tmp_path / "README").write_text("not an adapter")
    (tmp_path / "..data").mkdir()  # a mounted volume's bookkeeping
    found = discover_adapters(tmp_path, {"alpha": "0.25"})
    assert [(a.name, a.rank, a.strength) for a in found] == [("alpha", 8, 0.25), ("beta", 16, 1.0)]
    assert found[0].path == tmp_path / "alpha"


def test_a_directory_without_adapter_config_stops_start_up(tmp_path: Path) -> None:
    make_adapter(tmp_path, "good")
    (tmp_path / "broken").mkdir()
    with pytest.raises(AdapterError, match=r"broken.*KAITO_ADAPTERS_DIR.*adapter_config.json"):
        discover_adapters(tmp_path, {})


@pytest.mark.parametrize("value", ["x", "1.5", "-0.1", "nan", "inf", ""])
def test_a_strength_outside_zero_to_one_names_the_variable(tmp_path: Path, value: str) -> None:
    make_adapter(tmp_path, "tone")
    with pytest.raises(AdapterError, match=r"environment variable tone.*\[0, 1\]"):
        discover_adapters(tmp_path, {"tone": value})


@pytest.mark.parametrize("value", ["0", "1", "0.5", "1e-1"])
def test_strengths_in_range_are_read_as_kaito_does(tmp_path: Path, value: str) -> None:
    make_adapter(tmp_path, "tone")
    assert discover_adapters(tmp_path, {"tone": value})[0].strength == float(value)


def test_names_differing_only_in_case_clash(tmp_path: Path) -> None:
    make_adapter(tmp_path, "Tone")
    make_adapter(tmp_path, "tone")
    with pytest.raises(AdapterError, match="clashes"):
        discover_adapters(tmp_path, {})


def test_an_adapter_named_like_the_base_model_clashes(tmp_path: Path) -> None:
    make_adapter(tmp_path, "phi-4")
    with pytest.raises(AdapterError, match="base model's served name"):
        discover_adapters(tmp_path, {}, base_name="phi-4")


def test_a_rank_vllm_cannot_serve_names_the_file(tmp_path: Path) -> None:
    make_adapter(tmp_path, "huge", r=8, rank_pattern={"q_proj": 1024})
    with pytest.raises(AdapterError, match=r"huge/adapter_config.json.*1024"):
        discover_adapters(tmp_path, {})


def test_a_config_that_is_not_lora_or_not_json_is_refused(tmp_path: Path) -> None:
    make_adapter(tmp_path, "ia3", peft_type="IA3")
    with pytest.raises(AdapterError, match="peft_type must be LORA"):
        discover_adapters(tmp_path, {})
    (tmp_path / "ia3" / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterError, match="cannot be read as JSON"):
        discover_adapters(tmp_path, {})


def test_combination_rules_follow_peft(tmp_path: Path) -> None:
    make_adapter(tmp_path, "a", r=8)
    make_adapter(tmp_path, "b", r=16)
    with pytest.raises(AdapterError, match="KAITO_ADAPTER_COMBINATION=linear"):
        discover_adapters(tmp_path, {}, combination="linear")
    with pytest.raises(AdapterError, match="KAITO_ADAPTER_COMBINATION must be one of"):
        discover_adapters(tmp_path, {}, combination="ties")
    make_adapter(tmp_path, "c", r=320)
    make_adapter(tmp_path, "d", r=256)
    with pytest.raises(AdapterError, match="rank 600"):
        discover_adapters(tmp_path, {}, combination="cat")
    assert len(discover_adapters(tmp_path, {}, combination="svd")) == 4


@pytest.mark.parametrize(
    ("ranks", "combination", "expected"),
    [([8], "cat", 8), ([8, 16], "svd", 16), ([8, 16], "cat", 24), ([4, 4], "linear", 4)],
)
def test_combined_rank(ranks: list[int], combination: str, expected: int) -> None:
    assert combined_rank(ranks, combination) == expected


@pytest.mark.parametrize(("rank", "expected"), [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320)])
def test_max_lora_rank_rounds_up_to_what_vllm_accepts(rank: int, expected: int) -> None:
    assert vllm_max_lora_rank(rank) == expected
    with pytest.raises(AdapterError):
        vllm_max_lora_rank(513)


def test_the_rank_table_is_vllms() -> None:
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    assert get_args(MaxLoRARanks) == VLLM_LORA_RANKS


def served(tmp_path: Path) -> ServedAdapters:
    found = discover_adapters(tmp_path, {})
    return ServedAdapters(tuple(found), "cat", tmp_path / "combined-0123")


def test_requests_select_an_adapter_by_model(tmp_path: Path) -> None:
    make_adapter(tmp_path, "a", r=8)
    make_adapter(tmp_path, "b", r=16)
    s = served(tmp_path)
    assert select_adapter(None, s, "base") == "combined-0123"
    assert select_adapter("base", s, "base") is None
    assert select_adapter("b", s, "base") == "b"
    assert select_adapter("combined-0123", s, "base") == "combined-0123"
    with pytest.raises(UnknownModel):
        select_adapter("c", s, "base")
    assert select_adapter(None, NO_ADAPTERS, "base") is None
    # vLLM numbers its LoRA modules 1..N in the order they are given; cat sums the ranks.
    assert [s.lora_id(n) for n in ("a", "b", "combined-0123")] == [1, 2, 3]
    assert s.max_lora_rank() == 32
    assert not NO_ADAPTERS


def test_vllm_gets_lora_arguments_only_with_adapters(tmp_path: Path) -> None:
    from app.engines.vllm_engine import VLLMEngine, lora_engine_args
    from app.settings import Settings

    assert lora_engine_args(NO_ADAPTERS) == {}
    plain = VLLMEngine(Settings()).engine_args(on_gpu=False)
    assert not {"enable_lora", "max_lora_rank", "max_loras"} & set(plain)
    make_adapter(tmp_path, "a", r=8)
    make_adapter(tmp_path, "b", r=24)
    engine = VLLMEngine(Settings())
    engine.adapters = served(tmp_path)  # cat: the combination's rank is 32
    args = engine.engine_args(on_gpu=False)
    assert (args["enable_lora"], args["max_lora_rank"], args["max_loras"]) == (True, 32, 3)


def test_engine_args_may_not_set_what_the_adapters_decide() -> None:
    from app.engines.vllm_args import EngineArgsError, check_engine_args

    with pytest.raises(EngineArgsError, match="KAITO_ADAPTERS_DIR"):
        check_engine_args({"max_loras": 4}, on_gpu=False, adapters={})


def test_a_plain_transformers_model_runs_with_no_adapter() -> None:
    """The transformers backend without adapters holds a plain transformers model, which
    has transformers' own set_adapter but not PEFT's disable_adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with active_adapter(model, None):
        pass
    no_adapters = pytest.raises(ValueError, match="'alpha' asked of a model without adapters")
    with no_adapters, active_adapter(model, "alpha"):
        pass
