"""DispatchEngine routing (app/engines/dispatch.py) with fake backends."""

import json

import pytest

from app.engines.base import GeneratedSequence, GenerationRequest, GenerationResult
from app.engines.dispatch import DispatchEngine, model_architectures
from app.settings import Settings
from param_mapping import BeamSpec, ParameterError, SamplingSpec, SpecialTokens


class FakeEngine:
    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False
        self.seen: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.tokenizer = f"{name}-tokenizer"
        self.special_tokens = SpecialTokens(2, 2, 1, 100)
        self.max_model_len = 123 if name == "vllm" else 456

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def is_ready(self) -> bool:
        return self.started

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.seen.append(request)
        return GenerationResult(sequences=[GeneratedSequence([7], "stop")], backend=self.name)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def make(supports: bool = True, **settings) -> tuple[DispatchEngine, FakeEngine, FakeEngine]:
    vllm, hf = FakeEngine("vllm"), FakeEngine("hf")
    engine = DispatchEngine(
        Settings(**settings), vllm_factory=lambda _: vllm, hf=hf, supports=lambda _: supports
    )
    return engine, vllm, hf


def req(backend="vllm", beam=None, reason=None) -> GenerationRequest:
    return GenerationRequest(
        request_id="r1",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingSpec(temperature=0.0, max_tokens=4, stop_token_ids=[2]),
        backend=backend,
        backend_reason=reason,
        beam=beam,
        transformers_kwargs={"max_new_tokens": 4},
    )


async def test_auto_serves_with_vllm_and_loads_transformers_lazily():
    engine, vllm, hf = make()
    await engine.start()
    assert vllm.started and not hf.started  # no second copy until needed
    assert engine.is_ready() and engine.name == "vllm" and engine.max_model_len == 123
    result = await engine.generate(req())
    assert result.backend == "vllm" and vllm.seen and not hf.seen
    group = BeamSpec(num_beams=4, num_beam_groups=2, diversity_penalty=1.0)
    result = await engine.generate(req("hf", group, "generate_kwargs.num_beam_groups"))
    assert result.backend == "hf" and len(hf.seen) == 1


async def test_auto_serves_with_transformers_when_vllm_lacks_the_architecture():
    engine, vllm, hf = make(supports=False)
    await engine.start()
    assert hf.started and not vllm.started and engine.vllm is None
    assert (
        engine.name == "hf" and engine.tokenizer == "hf-tokenizer" and engine.max_model_len == 456
    )
    assert (await engine.generate(req())).backend == "hf"
    assert (await engine.generate(req(beam=BeamSpec(num_beams=2)))).backend == "hf"


async def test_backend_hf_forces_transformers_and_vllm_skips_the_check():
    engine, vllm, hf = make(supports=True, backend="hf")
    await engine.start()
    assert engine.route(req()) == "hf" and not vllm.started
    engine, vllm, hf = make(supports=False, backend="vllm")
    await engine.start()
    assert vllm.started and engine.route(req()) == "vllm"


@pytest.mark.parametrize(
    ("settings", "where"),
    [
        # auto: the step loop on a GPU, the batched transformers backend on CPU...
        ({"device": "cuda"}, "vllm-beam"),
        ({"device": "cpu"}, "hf"),
        # ...unless the transformers backend may not load.
        ({"device": "cpu", "hf_fallback": False}, "vllm-beam"),
        ({"device": "cpu", "beam_backend": "vllm"}, "vllm-beam"),
        ({"device": "cuda", "beam_backend": "hf"}, "hf"),
    ],
)
async def test_where_plain_beam_search_runs(settings, where):
    engine, *_ = make(**settings)
    await engine.start()
    assert engine.route(req(beam=BeamSpec(num_beams=4))) == where


async def test_beam_search_needing_more_logprobs_than_vllm_returns_goes_to_transformers():
    engine, vllm, _ = make(beam_backend="vllm")
    await engine.start()
    # 8 beams with 3 eos ids: K = (1 + 3) * 8 = 32 top log-probs > vLLM's 20.
    request = GenerationRequest(
        request_id="r",
        prompt_token_ids=[1],
        sampling=SamplingSpec(temperature=0.0, max_tokens=4, stop_token_ids=[2, 3, 4]),
        beam=BeamSpec(num_beams=8),
    )
    assert engine.route(request) == "hf"


async def test_without_the_fallback_a_request_needing_transformers_is_a_400():
    engine, _, hf = make(hf_fallback=False)
    await engine.start()
    group = BeamSpec(num_beams=4, num_beam_groups=2, diversity_penalty=1.0)
    with pytest.raises(ParameterError) as err:
        await engine.generate(req("hf", group, "generate_kwargs.num_beam_groups"))
    assert err.value.parameter == "generate_kwargs.num_beam_groups"
    assert "KAITO_HF_FALLBACK" in err.value.message and not hf.seen


async def test_preload_and_stop_and_abort():
    engine, vllm, hf = make(hf_preload=True)
    await engine.start()
    assert vllm.started and hf.started
    await engine.abort("x")
    assert vllm.aborted == ["x"] and hf.aborted == ["x"]
    await engine.stop()
    assert not vllm.started and not hf.started


def test_model_architectures(tmp_path):
    assert model_architectures(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    assert model_architectures(str(tmp_path)) == ["FooForCausalLM"]
    assert model_architectures("org/some-hub-id") is None
