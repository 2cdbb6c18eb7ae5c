"""Settings and start-up checks for models spread over several devices or nodes, without
starting an engine: KAITO_ENGINE_ARGS against vLLM's real AsyncEngineArgs, the parallel
layout checks, the CPU thread binding per rank and the Ray cluster wait's timeout."""

import json
import time

import pytest
from pydantic import ValidationError

from app.distributed import StartupError, check_parallel_layout, wait_until
from app.engines.vllm_args import SERVER_OWNED, SETTING_FOR, EngineArgsError, check_engine_args
from app.engines.vllm_engine import VLLMEngine, cpu_binding
from app.settings import Settings, load_settings, parse_engine_args

# --- KAITO_ENGINE_ARGS: parsing -------------------------------------------------------


def test_engine_args_inline_json_and_files(tmp_path):
    assert parse_engine_args('{"block_size": 32}') == {"block_size": 32}
    yaml_file = tmp_path / "engine.yaml"
    yaml_file.write_text("kv_cache_dtype: fp8\nspeculative_config:\n  method: ngram\n")
    assert parse_engine_args(str(yaml_file)) == {
        "kv_cache_dtype": "fp8",
        "speculative_config": {"method": "ngram"},
    }
    json_file = tmp_path / "engine.json"
    json_file.write_text(json.dumps({"enable_prefix_caching": True}))
    assert parse_engine_args(str(json_file)) == {"enable_prefix_caching": True}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"block_size": }', "not valid JSON"),
        ("/nonexistent/engine.yaml", "neither a JSON object"),
        ("[1, 2]", "neither a JSON object"),
    ],
)
def test_engine_args_that_do_not_parse_stop_settings(value, message):
    with pytest.raises(ValidationError, match=message):
        Settings(engine_args=value)


def test_engine_args_file_must_hold_an_object(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- block_size\n")
    with pytest.raises(ValidationError, match="must hold an object"):
        Settings(engine_args=str(f))


def test_engine_args_merge_into_the_servers():
    settings = Settings(engine_args='{"max_num_batched_tokens": 32, "enable_prefix_caching": true}')
    args = VLLMEngine(settings).engine_args(on_gpu=False)
    assert args["max_num_batched_tokens"] == 32 and args["enable_prefix_caching"] is True
    assert args["logprobs_mode"] == "raw_logprobs"  # the server's own stay


def test_parallel_settings_reach_the_engine():
    s = Settings(
        tensor_parallel_size=8, pipeline_parallel_size=2, distributed_executor_backend="ray"
    )
    args = VLLMEngine(s).engine_args(on_gpu=True)
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (8, 2)
    assert args["distributed_executor_backend"] == "ray"
    # Unset: None, which start() drops, so vLLM picks its default.
    assert VLLMEngine(Settings()).engine_args(on_gpu=True)["distributed_executor_backend"] is None


@pytest.mark.parametrize(
    ("env", "flag", "flag_value", "field", "parsed"),
    [
        ("2", "--pipeline-parallel-size", "4", "pipeline_parallel_size", (2, 4)),
        (
            "mp",
            "--distributed-executor-backend",
            "ray",
            "distributed_executor_backend",
            ("mp", "ray"),
        ),
        ("30", "--ray-cluster-timeout-seconds", "60", "ray_cluster_timeout_seconds", (30.0, 60.0)),
        ('{"block_size": 16}', "--engine-args", '{"block_size": 32}', "engine_args", None),
    ],
)
def test_new_settings_from_env_and_flag(monkeypatch, env, flag, flag_value, field, parsed):
    monkeypatch.setenv(f"KAITO_{field.upper()}", env)
    from_env, from_flag = load_settings([]), load_settings([flag, flag_value])
    if parsed is None:
        parsed = (env, flag_value)
    assert (getattr(from_env, field), getattr(from_flag, field)) == parsed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"distributed_executor_backend": "uni"},
        {"pipeline_parallel_size": 0},
        {"ray_cluster_timeout_seconds": 0},
        {"backend": "hf", "engine_args": '{"block_size": 16}'},
        {"backend": "hf", "pipeline_parallel_size": 2},
        {"backend": "hf", "distributed_executor_backend": "mp"},
    ],
)
def test_bad_parallel_settings_stop_start_up(kwargs):
    with pytest.raises(ValidationError):
        Settings(**kwargs)


# --- KAITO_ENGINE_ARGS: checked against vLLM's AsyncEngineArgs ---------------------------


@pytest.fixture(scope="module")
def vllm_fields():
    from app.engines.vllm_args import engine_arg_adapters

    return engine_arg_adapters()


@pytest.mark.parametrize(
    "overrides",
    [
        {"quantization": "fp8"},
        {"kv_cache_dtype": "fp8"},
        {"enable_prefix_caching": True},
        {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}},
        {"max_num_batched_tokens": 4096},
        {"compilation_config": {"mode": 0}},
        {"kv_cache_memory_bytes": 1 << 30},  # on a GPU it is vLLM's to size
    ],
)
def test_vllm_engine_arguments_pass(vllm_fields, overrides):
    check_engine_args(overrides, on_gpu=True, adapters=vllm_fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_sise": 32}, "'block_sise' is not a vLLM engine argument"),
        ({"max_num_batched_tokens": "32"}, "'max_num_batched_tokens' has the wrong type"),
        ({"block_size": 32}, "controlled by KAITO_BLOCK_SIZE"),
        ({"enable_prefix_caching": "yes"}, "'enable_prefix_caching' has the wrong type"),
        ({"kv_cache_dtype": "fp9"}, "'kv_cache_dtype' has the wrong type or value 'fp9'"),
        ({"speculative_config": "ngram"}, "'speculative_config' has the wrong type"),
        ({"tensor_parallel_size": 2}, "controlled by KAITO_TENSOR_PARALLEL_SIZE"),
        ({"pipeline_parallel_size": 2}, "controlled by KAITO_PIPELINE_PARALLEL_SIZE"),
        ({"distributed_executor_backend": "ray"}, "KAITO_DISTRIBUTED_EXECUTOR_BACKEND"),
        ({"model": "/other"}, "controlled by KAITO_MODEL"),
        ({"logprobs_mode": "raw_logprobs"}, "controlled by KAITO_OUTPUT_SCORES"),
        ({"disable_log_stats": True}, "'disable_log_stats' cannot be set"),
    ],
)
def test_refused_engine_arguments_name_the_key(vllm_fields, overrides, message):
    with pytest.raises(EngineArgsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_engine_args(overrides, on_gpu=True, adapters=vllm_fields)


def test_kv_cache_bytes_belongs_to_the_cpu_setting(vllm_fields):
    with pytest.raises(EngineArgsError, match="KAITO_KV_CACHE_SPACE_GIB"):
        check_engine_args({"kv_cache_memory_bytes": 1 << 30}, on_gpu=False, adapters=vllm_fields)


def test_every_key_the_server_owns_is_a_real_vllm_argument(vllm_fields):
    """The refusal lists track vLLM: a renamed argument would leave a dead entry here."""
    assert set(SETTING_FOR) | set(SERVER_OWNED) <= set(vllm_fields)
    # And every argument the server passes itself is in one of them.
    passed = set(VLLMEngine(Settings()).engine_args(on_gpu=True))
    assert passed <= set(SETTING_FOR) | set(SERVER_OWNED)


# --- the parallel layout -------------------------------------------------------------


def test_more_gpus_than_visible_stops_start_up():
    s = Settings(tensor_parallel_size=4, pipeline_parallel_size=2)
    with pytest.raises(StartupError) as caught:
        check_parallel_layout(s, on_gpu=True, gpus=lambda: 4)
    message = str(caught.value)
    assert "KAITO_TENSOR_PARALLEL_SIZE=4 x KAITO_PIPELINE_PARALLEL_SIZE=2 = 8" in message
    assert "sees 4" in message
    check_parallel_layout(s, on_gpu=True, gpus=lambda: 8)
    # On CPU there are no GPUs to count; with ray the cluster holds them.
    check_parallel_layout(s, on_gpu=False, gpus=lambda: 0)
    ray = Settings(
        tensor_parallel_size=8, pipeline_parallel_size=2, distributed_executor_backend="ray"
    )
    check_parallel_layout(ray, on_gpu=True, gpus=lambda: 8, has_ray=lambda: True)


def test_ray_backend_without_ray_stops_start_up():
    s = Settings(distributed_executor_backend="ray")
    with pytest.raises(StartupError, match="needs the `ray` package"):
        check_parallel_layout(s, on_gpu=True, gpus=lambda: 1, has_ray=lambda: False)


@pytest.mark.parametrize(
    ("world", "cpus", "expected"),
    [
        (2, [0, 1], "0|1"),
        (2, [0, 1, 2, 3, 4], "0,1,2|3,4"),
        (4, list(range(8)), "0,1|2,3|4,5|6,7"),
        (1, [3, 5], "3,5"),
    ],
)
def test_cpu_binding_splits_this_process_cpus(world, cpus, expected):
    assert cpu_binding(world, cpus) == expected


def test_cpu_binding_needs_a_cpu_per_rank():
    with pytest.raises(StartupError, match="2 CPU workers, but this process may use only 1"):
        cpu_binding(2, [0])


def test_cluster_wait_times_out_with_what_it_saw():
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(StartupError) as caught:
        wait_until(
            lambda: (False, "1 nodes, 8 GPUs"), 10, "2 nodes", sleep=sleep, clock=lambda: now[0]
        )
    assert "did not reach 2 nodes within 10 s" in str(caught.value)
    assert "it has 1 nodes, 8 GPUs" in str(caught.value)
    assert 10 <= now[0] <= 12
    calls = iter([(False, "a"), (True, "b")])
    assert wait_until(lambda: next(calls), 10, "x", sleep=sleep, clock=lambda: now[0]) == "b"


def test_no_ray_cluster_at_an_address_fails_within_the_timeout():
    """ray.init on an address where nothing listens retries for minutes; the TCP wait
    before it gives up at the timeout, naming the address."""
    from app.distributed import connect_to_ray
    from tests.conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StartupError, match=f"no Ray cluster at '{address}'"):
        connect_to_ray(address, timeout_s=1)
    assert time.monotonic() - started < 10


def test_vllm_only_settings_stop_start_up_when_auto_picks_transformers():
    import asyncio

    from app.engines.dispatch import DispatchEngine

    class NeverStarted:
        async def start(self) -> None:
            raise AssertionError("transformers must not load")

    for kwargs in (
        {"engine_args": '{"block_size": 16}'},
        {"distributed_executor_backend": "mp"},
        {"pipeline_parallel_size": 2},
    ):
        engine = DispatchEngine(Settings(**kwargs), hf=NeverStarted(), supports=lambda _: False)
        with pytest.raises(StartupError, match="vLLM cannot serve"):
            asyncio.run(engine.start())
