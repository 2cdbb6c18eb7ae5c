"""The default adapter merged into the weights (app/adapter_merge.py), on a tiny model:
the merged model against PEFT's unmerged adapter, and when a merge is reused."""

import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from app.adapter_merge import MODEL_CONFIG, build_merged, merged_model_dir
from tests.unit.tiny_llama import VOCAB, tiny_llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def tiny_model(tmp_path: Path, model_dir: Path) -> Path:
    out = tmp_path / "tiny"
    tiny_llama(seed=0).to(torch.float32).save_pretrained(out)
    for name in TOKENIZER_FILES:  # any tokenizer: the merge only copies it
        shutil.copy(model_dir / name, out / name)
    return out


@pytest.fixture
def adapter(tmp_path: Path, tiny_model: Path) -> Path:
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    out = tmp_path / "adapter"
    get_peft_model(base, config).save_pretrained(out)
    return out


def test_the_merged_model_computes_what_peft_computes_unmerged(
    tmp_path: Path, tiny_model: Path, adapter: Path
) -> None:
    merged_dir = build_merged(str(tiny_model), adapter, torch.float32, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in name for name in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = unmerged(ids).logits
        with unmerged.disable_adapter():
            plain = unmerged(ids).logits
        got = merged(ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name in TOKENIZER_FILES:
        assert (merged_dir / name).is_file()


def test_a_finished_merge_is_reused_and_an_interrupted_one_rebuilt(
    tmp_path: Path, tiny_model: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"half written")  # no config.json: interrupted
    build_merged(str(tiny_model), adapter, torch.float32, out)
    assert (out / MODEL_CONFIG).is_file()
    assert (out / "model.safetensors").stat().st_size > 1000

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished merge must not be built again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    assert build_merged(str(tiny_model), adapter, torch.float32, out) == out
    assert not list(tmp_path.glob(".staging-*"))


def test_the_merge_directory_changes_with_what_is_merged(tmp_path: Path, tiny_model: Path) -> None:
    combined = tmp_path / "combined-0123"
    first = merged_model_dir(tmp_path, str(tiny_model), combined, "torch.float32")
    assert first == merged_model_dir(tmp_path, str(tiny_model), combined, "torch.float32")
    assert first.parent == tmp_path / "kaito-merged"
    others = {
        merged_model_dir(tmp_path, str(tiny_model), tmp_path / "combined-4567", "torch.float32"),
        merged_model_dir(tmp_path, str(tiny_model), combined, "torch.bfloat16"),
        merged_model_dir(tmp_path, "org/other-model", combined, "torch.float32"),
    }
    assert first not in others and len(others) == 3
    (tiny_model / MODEL_CONFIG).write_text((tiny_model / MODEL_CONFIG).read_text() + "\n")
    assert merged_model_dir(tmp_path, str(tiny_model), combined, "torch.float32") != first


def test_merging_is_refused_where_ray_workers_load_the_model(monkeypatch) -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError, match="KAITO_PER_REQUEST_ADAPTERS=false"):
        Settings(per_request_adapters=False, distributed_executor_backend="ray")
    monkeypatch.setenv("KAITO_PER_REQUEST_ADAPTERS", "false")
    assert Settings().per_request_adapters is False
    assert Settings(distributed_executor_backend="mp").per_request_adapters is False
