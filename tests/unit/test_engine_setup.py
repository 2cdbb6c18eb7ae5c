"""How the vLLM engine is set up, without starting it: the environment the engine core
reads, the engine arguments, and the settings from env vars and flags."""

import os

import pytest

from app.engines.vllm_engine import (
    VLLMEngine,
    check_attention_backend,
    configure_vllm_environment,
    usable_cpus,
)
from app.settings import Settings, load_settings

ENGINE_ENV = (
    "VLLM_USE_V2_MODEL_RUNNER",
    "VLLM_LOGGING_LEVEL",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "OMP_NUM_THREADS",
    "VLLM_CPU_KVCACHE_SPACE",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cpu_environment(clean_env):
    configure_vllm_environment(Settings(kv_cache_space_gib=3, log_level="warning"), on_gpu=False)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert os.environ["OMP_NUM_THREADS"] == str(usable_cpus())
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_gpu_environment_leaves_the_cpu_knobs_alone(clean_env):
    configure_vllm_environment(Settings(), on_gpu=True)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO"
    assert not {"OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE"} & set(os.environ)


def test_an_operators_environment_wins(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "7")
    clean_env.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    configure_vllm_environment(Settings(), on_gpu=False)
    assert (os.environ["OMP_NUM_THREADS"], os.environ["VLLM_LOGGING_LEVEL"]) == ("7", "DEBUG")


@pytest.mark.parametrize(
    ("files", "expected_at_most"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs: round up
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
    ],
)
def test_usable_cpus_honours_a_containers_cpu_limit(tmp_path, files, expected_at_most):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(str(tmp_path)) == min(affinity, expected_at_most)


@pytest.mark.parametrize(
    "files",
    [
        {"cpu.max": "max 100000\n"},
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
        {},
    ],
)
def test_usable_cpus_without_a_limit_is_the_affinity_set(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert usable_cpus(str(tmp_path)) == len(os.sched_getaffinity(0))


def test_engine_args():
    engine = VLLMEngine(Settings(model="/models/m", max_model_len=4096, enforce_eager=True))
    cpu, gpu = engine.engine_args(on_gpu=False), engine.engine_args(on_gpu=True)
    # No bf16 kernels on AVX2 machines: float32 on CPU, the model's own dtype on a GPU.
    assert (cpu["dtype"], gpu["dtype"]) == ("float32", "auto")
    assert VLLMEngine(Settings(dtype="bfloat16")).engine_args(on_gpu=False)["dtype"] == "bfloat16"
    # Stats on: vLLM's vllm:* metrics live in this process's registry for /metrics.
    assert cpu["disable_log_stats"] is False
    assert (cpu["model"], cpu["max_model_len"], cpu["enforce_eager"]) == ("/models/m", 4096, True)
    assert cpu["logits_processors"] and cpu["logprobs_mode"] == "raw_logprobs"
    # vLLM's choice unless set; a GPU setting only.
    assert gpu["attention_backend"] is None
    pinned = VLLMEngine(Settings(attention_backend="FLASH_ATTN"))
    assert pinned.engine_args(on_gpu=True)["attention_backend"] == "FLASH_ATTN"
    assert pinned.engine_args(on_gpu=False)["attention_backend"] is None


def test_attention_backend_names_are_vllms():
    """The names vLLM 0.32 knows, case-insensitive; anything else stops start-up with a
    message that names the setting and the choices."""
    assert check_attention_backend("flash_attn") == "FLASH_ATTN"
    assert check_attention_backend("TRITON_ATTN") == "TRITON_ATTN"
    with pytest.raises(ValueError) as err:
        check_attention_backend("FLASH_ATTENTION_2")
    message = str(err.value)
    assert message.startswith("KAITO_ATTENTION_BACKEND='FLASH_ATTENTION_2' is not one of")
    assert "FLASH_ATTN" in message and "FLASHINFER" in message


SETTINGS = [
    # (field, env value, flag, flag value, parsed)
    ("model", "/a", "--model", "/b", ("/a", "/b")),
    ("dtype", "float16", "--dtype", "bfloat16", ("float16", "bfloat16")),
    ("max_model_len", "1024", "--max-model-len", "2048", (1024, 2048)),
    ("kv_cache_space_gib", "4", "--kv-cache-space-gib", "8", (4.0, 8.0)),
    ("gpu_memory_utilization", "0.5", "--gpu-memory-utilization", "0.8", (0.5, 0.8)),
    ("tensor_parallel_size", "2", "--tensor-parallel-size", "4", (2, 4)),
    (
        "attention_backend",
        "FLASH_ATTN",
        "--attention-backend",
        "TRITON_ATTN",
        ("FLASH_ATTN", "TRITON_ATTN"),
    ),
    ("enforce_eager", "true", "--enforce-eager", None, (True, True)),
    ("host", "127.0.0.1", "--host", "0.0.0.0", ("127.0.0.1", "0.0.0.0")),
    ("port", "6000", "--port", "7000", (6000, 7000)),
    ("log_level", "debug", "--log-level", "error", ("debug", "error")),
]


@pytest.mark.parametrize(("field", "env", "flag", "flag_value", "parsed"), SETTINGS)
def test_each_setting_from_env_and_from_its_flag_which_wins(
    monkeypatch, field, env, flag, flag_value, parsed
):
    monkeypatch.setenv(f"KAITO_{field.upper()}", env)
    assert getattr(load_settings([]), field) == parsed[0]
    argv = [flag] if flag_value is None else [flag, flag_value]
    assert getattr(load_settings(argv), field) == parsed[1]


def test_default_port_is_kaitos():
    assert Settings().port == 5000


# --- traces (app/tracing.py) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "env", "flag", "flag_value", "parsed"),
    [
        (
            "otlp_traces_endpoint", "http://a:4317", "--otlp-traces-endpoint",
            "https://b:4318/v1/traces", ("http://a:4317", "https://b:4318/v1/traces"),
        ),
        (
            "otlp_traces_protocol", "grpc", "--otlp-traces-protocol", "http/protobuf",
            ("grpc", "http/protobuf"),
        ),
    ],
)  # fmt: skip
def test_tracing_settings_from_env_and_flag(monkeypatch, field, env, flag, flag_value, parsed):
    test_each_setting_from_env_and_from_its_flag_which_wins(
        monkeypatch, field, env, flag, flag_value, parsed
    )


def test_tracing_is_off_by_default():
    settings = Settings()
    assert settings.otlp_traces_endpoint is None
    assert VLLMEngine(settings).engine_args(on_gpu=False)["otlp_traces_endpoint"] is None


@pytest.mark.parametrize("endpoint", ["collector:4317", "grpc://collector:4317", "http://"])
def test_a_bad_otlp_endpoint_names_the_setting(endpoint):
    with pytest.raises(ValueError, match="otlp_traces_endpoint"):
        Settings(otlp_traces_endpoint=endpoint)


def test_tracing_on_reaches_vllm(clean_env):
    clean_env.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    settings = Settings(
        otlp_traces_endpoint="http://c:4318/v1/traces", otlp_traces_protocol="http/protobuf"
    )
    # vLLM's exporters (its frontend and engine-core processes) speak the same transport.
    configure_vllm_environment(settings, on_gpu=True)
    assert os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    args = VLLMEngine(settings).engine_args(on_gpu=True)
    assert args["otlp_traces_endpoint"] == "http://c:4318/v1/traces"


def test_tracing_off_leaves_the_otel_environment_alone(clean_env):
    clean_env.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    configure_vllm_environment(Settings(), on_gpu=True)
    assert "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" not in os.environ


# The server without the OpenTelemetry packages: importing them is made to fail.
WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # any `import opentelemetry...` raises ImportError
from app.server import create_app
from app.settings import Settings
from app.tracing import TracingMiddleware
settings = Settings(**{extra})
try:
    app = create_app(settings)
except RuntimeError as exc:
    print("REFUSED", exc)
    sys.exit(0)
assert not any(m.cls is TracingMiddleware for m in app.user_middleware)
print("SERVED", [m for m, v in sys.modules.items() if m.startswith("opentelemetry") and v])
"""


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("{}", "SERVED []"),
        (
            "{'otlp_traces_endpoint': 'http://c:4317'}",
            "REFUSED KAITO_OTLP_TRACES_ENDPOINT is set but OpenTelemetry is not installed",
        ),
    ],
)
def test_the_server_needs_opentelemetry_only_when_tracing(extra, expected):
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_OTEL.replace("{extra}", extra)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(expected), result.stdout
