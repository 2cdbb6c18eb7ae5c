"""KAITO_BLOCK_SIZE: one source for the KV block size, with a CPU default of our own."""

import pytest

from app.distributed import StartupError
from app.engines.vllm_args import EngineArgsError, check_engine_args
from app.engines.vllm_engine import CPU_BLOCK_SIZE, VLLMEngine, check_block_size
from app.settings import Settings, load_settings


def test_cpu_gets_small_blocks_and_the_gpu_keeps_vllms_default():
    engine = VLLMEngine(Settings())
    assert engine.engine_args(on_gpu=False)["block_size"] == CPU_BLOCK_SIZE == 32
    assert engine.engine_args(on_gpu=True)["block_size"] is None  # dropped: vLLM decides


def test_the_setting_wins_on_both():
    engine = VLLMEngine(Settings(block_size=16))
    assert engine.engine_args(on_gpu=False)["block_size"] == 16
    assert engine.engine_args(on_gpu=True)["block_size"] == 16


def test_env_and_flag(monkeypatch):
    monkeypatch.setenv("KAITO_BLOCK_SIZE", "64")
    assert load_settings([]).block_size == 64
    assert load_settings(["--block-size", "128"]).block_size == 128


def test_engine_args_cannot_set_it_too():
    with pytest.raises(EngineArgsError, match="controlled by KAITO_BLOCK_SIZE"):
        check_engine_args({"block_size": 16}, on_gpu=False, adapters={})


def test_a_bad_value_stops_start_up():
    with pytest.raises(ValueError, match="block_size"):
        Settings(block_size=0)


def test_cpu_blocks_must_be_a_multiple_of_32_before_the_engine_starts():
    with pytest.raises(StartupError, match="KAITO_BLOCK_SIZE must be a multiple of 32 on CPU"):
        check_block_size(16, on_gpu=False)
    for ok in (None, 32, 64, 128):
        check_block_size(ok, on_gpu=False)
    check_block_size(16, on_gpu=True)  # the GPU backends decide there (16 is their default)
