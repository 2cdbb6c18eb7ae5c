"""Which top-k/top-p sampler vLLM picks on CUDA follows from the configuration the server
builds (KAITO_OUTPUT_SCORES), and requests asking for scores without it get a 400.

No GPU: vLLM's model config is built from the server's own engine arguments on the real
model directory, and vLLM's real ``Sampler`` (which builds its ``TopKTopPSampler``) is
constructed from that config's ``logprobs_mode`` with the platform reporting CUDA. The one
thing stood in for is ``flashinfer_sampler_supported``, the check of the GPU itself
(compute capability, SM count, FlashInfer's kernels); vLLM's own condition on the logprobs
mode in ``TopKTopPSampler.__init__`` runs as it is.
"""

import asyncio
import functools

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.sample.ops import topk_topp_sampler
from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler
from vllm.v1.sample.sampler import Sampler

from app.engines.base import GenerationRequest
from app.engines.vllm_engine import VLLMEngine, refuse_scores_without_setting
from app.settings import Settings
from param_mapping import ParameterError, SamplingSpec


@functools.cache  # building vLLM's model config takes seconds
def vllm_logprobs_mode(model_dir, output_scores: bool) -> str:
    """logprobs_mode as vLLM's model config holds it, built from the server's arguments
    for a GPU (the model runner builds its Sampler from this value)."""
    settings = Settings(model=str(model_dir), output_scores=output_scores)
    args = {k: v for k, v in VLLMEngine(settings).engine_args(on_gpu=True).items() if v is not None}
    return AsyncEngineArgs(**args).create_model_config().logprobs_mode


@pytest.fixture
def on_cuda(monkeypatch):
    """vLLM's platform reports CUDA to the sampler module (and still CPU to the rest)."""
    monkeypatch.setattr(topk_topp_sampler.current_platform, "is_cuda", lambda: True)


def chosen(sampler: Sampler) -> str:
    return sampler.topk_topp_sampler.forward.__func__.__name__


@pytest.mark.parametrize(
    ("output_scores", "mode", "forward"),
    [
        (False, "raw_logprobs", "forward_cuda"),  # FlashInfer's top-k/top-p sampler
        (True, "processed_logprobs", "forward_native"),  # vLLM's PyTorch sampler
    ],
)
def test_flashinfer_sampler_follows_output_scores(
    model_dir, on_cuda, monkeypatch, output_scores, mode, forward
):
    # A GPU on which FlashInfer's sampler works (what vLLM checks on the device itself).
    monkeypatch.setattr(topk_topp_sampler, "flashinfer_sampler_supported", lambda: True)
    logprobs_mode = vllm_logprobs_mode(model_dir, output_scores)
    assert logprobs_mode == mode
    sampler = Sampler(logprobs_mode=logprobs_mode)
    assert chosen(sampler) == forward
    assert isinstance(sampler.topk_topp_sampler, TopKTopPSampler)


def test_the_images_switch_keeps_the_native_sampler(model_dir, on_cuda, monkeypatch):
    """The gpu image sets VLLM_USE_FLASHINFER_SAMPLER=0 (no nvcc for FlashInfer's JIT,
    docs/GPU.md): vLLM's real check then refuses FlashInfer before touching the GPU, in
    the default mode too."""
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "0")
    sampler = Sampler(logprobs_mode=vllm_logprobs_mode(model_dir, output_scores=False))
    assert chosen(sampler) == "forward_native"


def test_the_cpu_sampler_is_the_same_in_both_modes(model_dir):
    """On CPU vLLM has one sampler (fused Gumbel-max); the mode changes only whether
    each sampled step also computes a full-vocabulary log_softmax (bench/)."""
    for output_scores in (False, True):
        sampler = Sampler(logprobs_mode=vllm_logprobs_mode(model_dir, output_scores))
        assert chosen(sampler) == "forward_cpu"


def scores_request() -> GenerationRequest:
    return GenerationRequest(
        request_id="r", prompt_token_ids=[1, 2, 3], sampling=SamplingSpec(max_tokens=4, logprobs=0)
    )


def test_scores_without_the_setting_are_a_400_naming_it():
    engine = VLLMEngine(Settings())
    with pytest.raises(ParameterError, match="KAITO_OUTPUT_SCORES=true") as exc:
        asyncio.run(engine.generate(scores_request()))
    assert exc.value.parameter == "generate_kwargs.output_scores"

    async def first_delta() -> None:
        async for _ in engine.generate_stream(scores_request()):
            pass

    with pytest.raises(ParameterError, match="KAITO_OUTPUT_SCORES=true"):
        asyncio.run(first_delta())


def test_requests_without_scores_pass_either_way():
    for output_scores in (False, True):
        refuse_scores_without_setting(
            SamplingSpec(max_tokens=4), Settings(output_scores=output_scores)
        )
    refuse_scores_without_setting(scores_request().sampling, Settings(output_scores=True))
