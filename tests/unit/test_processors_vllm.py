"""vLLM's own sampler with our processor registered, against transformers.

No engine: the real ``vllm.v1.sample.sampler.Sampler`` (logprobs_mode
"processed_logprobs", as the server runs it) with vLLM's built-in logits processors and
ours, fed the SamplingParams the server builds (``to_sampling_params``). The oracle is
transformers ``generate`` on a tiny random Llama: each step's raw logits go through the
vLLM sampler and the distribution vLLM samples from must equal transformers' (after
softmax, max abs difference < 1e-5); greedy rows must pick transformers' token.

The batch tests drive the processor's batch state with vLLM's own BatchUpdateBuilder:
requests join and leave, rows are condensed (one-way moves) and swapped, a request is
preempted and re-added with its output list, and n > 1 children are separate rows.
"""

import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

vllm = pytest.importorskip("vllm")

from vllm.v1.sample.logits_processor import (  # noqa: E402
    BatchUpdateBuilder,
    LogitBiasLogitsProcessor,
    LogitsProcessors,
    MinPLogitsProcessor,
    MinTokensLogitsProcessor,
    MoveDirectionality,
)
from vllm.v1.sample.metadata import SamplingMetadata  # noqa: E402
from vllm.v1.sample.sampler import Sampler  # noqa: E402

from app.engines.processors.vllm_processor import TransformersRulesProcessor  # noqa: E402
from app.engines.vllm_engine import engine_eos_ids, to_sampling_params  # noqa: E402
from param_mapping import SpecialTokens, to_generation_plan  # noqa: E402

VOCAB = 48
EOS = 2
SPECIAL = SpecialTokens(eos_token_id=EOS, pad_token_id=EOS, bos_token_id=1, vocab_size=VOCAB)
CPU = torch.device("cpu")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


@dataclass
class Request:
    """One sequence: its params, prompt, the live output list, and transformers' run."""

    params: object
    prompt: list[int]
    raw: list[torch.Tensor]  # transformers' raw logits per step
    expected: list[torch.Tensor]  # transformers' processed scores per step
    tokens: list[int]  # transformers' chosen tokens
    output: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.output) == len(self.tokens)


def make_request(model, prompt: list[int], kwargs: dict, seed: int = 0) -> Request:
    plan = to_generation_plan(
        kwargs, prompt_tokens=len(prompt), prefix_tokens=0, special=SPECIAL, max_model_len=512
    )
    spec = plan.sampling
    resolved = ("max_length", "min_length", "max_new_tokens")
    hf = {k: v for k, v in kwargs.items() if k not in resolved}
    hf.setdefault("top_k", 10)  # Kaito's default, not transformers' 50
    ids = torch.tensor([prompt])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=spec.max_tokens,
            eos_token_id=EOS,
            pad_token_id=EOS,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
            **hf,
        )
    return Request(
        params=to_sampling_params(spec),
        prompt=prompt,
        raw=[x[0] for x in out.logits],
        expected=[x[0] for x in out.scores],
        tokens=out.sequences[0, len(prompt) :].tolist(),
    )


def new_processors() -> LogitsProcessors:
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=16))
    return LogitsProcessors(
        cls(config, CPU, False)
        for cls in (
            MinTokensLogitsProcessor,
            LogitBiasLogitsProcessor,
            MinPLogitsProcessor,
            TransformersRulesProcessor,
        )
    )


def metadata(rows: list[Request], processors: LogitsProcessors) -> SamplingMetadata:
    """What vLLM's InputBatch builds for these rows (gpu_input_batch._make_sampling_metadata)."""
    greedy = [r.params.temperature < 1e-5 for r in rows]
    temperature = torch.tensor(
        [0.0 if g else r.params.temperature for g, r in zip(greedy, rows, strict=True)]
    )
    top_k = [r.params.top_k if 0 < r.params.top_k < VOCAB else VOCAB for r in rows]
    top_p = [r.params.top_p for r in rows]
    for r in rows:  # the penalty is ours; vLLM's must be off
        assert r.params.repetition_penalty == 1.0 and r.params.min_tokens == 0
    return SamplingMetadata(
        temperature=None if all(greedy) else temperature,
        all_greedy=all(greedy),
        all_random=not any(greedy),
        top_p=None if all(p == 1.0 for p in top_p) else torch.tensor(top_p),
        top_k=None if all(k == VOCAB for k in top_k) else torch.tensor(top_k),
        generators={},
        max_num_logprobs=-1,  # the full processed log-prob rows
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(len(rows)),
        presence_penalties=torch.zeros(len(rows)),
        repetition_penalties=torch.ones(len(rows)),
        output_token_ids=[r.output for r in rows],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=processors,
    )


def sample_step(rows: list[Request], processors: LogitsProcessors, sampler: Sampler) -> None:
    """One vLLM sampling step over the batch; checks every row against transformers."""
    logits = torch.stack([r.raw[len(r.output)] for r in rows])
    out = sampler(logits.clone(), metadata(rows, processors))
    probs = out.logprobs_tensors.logprobs.exp()
    for i, r in enumerate(rows):
        step = len(r.output)
        expected = r.expected[step].softmax(-1)
        diff = (probs[i] - expected).abs().max().item()
        assert diff < 1e-5, f"row {i} step {step}: {diff}"
        if r.params.temperature < 1e-5:
            assert int(out.sampled_token_ids[i, 0]) == r.tokens[step]
        r.output.append(r.tokens[step])


PROMPT = [5, 6, 7, 5, 6, 8, 9, 5, 6, 7, 10, 11]

CASES = [
    {"do_sample": False},
    {"do_sample": False, "repetition_penalty": 1.3},
    {"do_sample": False, "no_repeat_ngram_size": 2, "bad_words_ids": [[36], [11, 44], [44, 29]]},
    {"do_sample": False, "encoder_no_repeat_ngram_size": 2, "min_new_tokens": 5},
    {"do_sample": False, "forced_eos_token_id": 3, "remove_invalid_values": True},
    # sampling with vLLM's own temperature / top-k / top-p after our processor
    {"do_sample": True, "temperature": 0.7, "top_k": 10, "top_p": 0.9},
    {
        "do_sample": True,
        "temperature": 1.3,
        "top_k": 0,
        "top_p": 0.8,
        "no_repeat_ngram_size": 1,
        "bad_words_ids": [[36], [5, 6, 9]],
    },
    {
        "do_sample": True,
        "temperature": 0.9,
        "top_k": 5,
        "repetition_penalty": 1.4,
        "min_new_tokens": 4,
        "forced_eos_token_id": 4,
    },
    # typical_p: the whole warper chain in our processor, vLLM's neutralised
    {"do_sample": True, "typical_p": 0.6, "temperature": 0.8, "top_k": 20, "top_p": 0.95},
    {
        "do_sample": True,
        "typical_p": 0.4,
        "top_k": 0,
        "repetition_penalty": 1.2,
        "encoder_no_repeat_ngram_size": 3,
        "remove_invalid_values": True,
    },
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(k))
def test_vllm_sampler_distribution_equals_transformers(tiny_model, kwargs):
    request = make_request(tiny_model, PROMPT, {"max_new_tokens": 12, **kwargs})
    processors = new_processors()
    sampler = Sampler(logprobs_mode="processed_logprobs")
    builder = BatchUpdateBuilder()
    builder.added.append((0, request.params, request.prompt, request.output))
    while not request.done:
        update = builder.get_and_reset(1)
        for p in processors.all:
            p.update_state(update)
        sample_step([request], processors, sampler)


def test_plain_requests_never_reach_the_processor(tiny_model):
    request = make_request(tiny_model, PROMPT, {"max_new_tokens": 3, "do_sample": True})
    assert request.params.extra_args is None
    ours = TransformersRulesProcessor(None, CPU, False)
    builder = BatchUpdateBuilder()
    builder.added.append((0, request.params, request.prompt, request.output))
    ours.update_state(builder.get_and_reset(1))
    assert ours.rows == {}
    logits = torch.randn(1, VOCAB)
    assert ours.apply(logits) is logits


class ContinuousBatch:
    """Mirrors vLLM's InputBatch bookkeeping with its BatchUpdateBuilder."""

    def __init__(self) -> None:
        self.rows: list[Request | None] = []
        self.builder = BatchUpdateBuilder()
        self.processors = new_processors()
        self.sampler = Sampler(logprobs_mode="processed_logprobs")

    def add(self, r: Request) -> None:
        index = self.builder.pop_removed()
        if index is None:
            index = len(self.rows)
            self.rows.append(r)
        else:
            self.rows[index] = r
        self.builder.added.append((index, r.params, r.prompt, r.output))

    def remove(self, r: Request) -> None:
        index = self.rows.index(r)
        self.rows[index] = None
        self.builder.removed_append(index)

    def condense(self) -> None:
        """InputBatch.condense: moves the last rows down into holes (one-way moves);
        holes at the end stay reported as removed."""
        while self.builder.has_removed():
            last = max((i for i, r in enumerate(self.rows) if r is not None), default=-1)
            hole = self.builder.peek_removed()
            if hole >= last:
                break
            self.builder.pop_removed()
            self.rows[hole], self.rows[last] = self.rows[last], None
            self.builder.moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        while self.rows and self.rows[-1] is None:
            self.rows.pop()

    def swap(self, i: int, j: int) -> None:
        self.rows[i], self.rows[j] = self.rows[j], self.rows[i]
        self.builder.moved.append((i, j, MoveDirectionality.SWAP))

    def step(self) -> None:
        update = self.builder.get_and_reset(len(self.rows))
        for p in self.processors.all:
            p.update_state(update)
        sample_step([r for r in self.rows if r is not None], self.processors, self.sampler)


def test_batch_isolation_under_continuous_batching(tiny_model):
    rng = random.Random(7)
    waiting = [
        make_request(tiny_model, PROMPT[i % 5 :], {"max_new_tokens": 10 + i % 4, **kwargs}, seed=i)
        for i, kwargs in enumerate(CASES + CASES[::-1])
    ]
    # n > 1: two children of one sampled request are two rows with their own outputs.
    child_kwargs = {
        "do_sample": True,
        "typical_p": 0.5,
        "no_repeat_ngram_size": 2,
        "max_new_tokens": 12,
    }
    waiting += [make_request(tiny_model, PROMPT, child_kwargs, seed=s) for s in (100, 101)]
    rng.shuffle(waiting)
    batch = ContinuousBatch()
    running: list[Request] = []
    preempted: list[Request] = []
    steps = 0
    while waiting or running or preempted:
        # As in vLLM's InputBatch: removals first, then additions, then condense / swaps.
        for r in [r for r in running if r.done]:  # finished requests leave
            batch.remove(r)
            running.remove(r)
        if len(running) > 2 and rng.random() < 0.2:  # preemption: out with its output list
            r = rng.choice(running)
            batch.remove(r)
            running.remove(r)
            preempted.insert(0, r)
        if preempted and rng.random() < 0.5:  # a preempted request comes back
            r = preempted.pop()
            batch.add(r)
            running.append(r)
        while waiting and len(running) < 6 and rng.random() < 0.7:  # new ones join
            r = waiting.pop()
            batch.add(r)
            running.append(r)
        batch.condense()
        if len(batch.rows) > 1 and rng.random() < 0.5:
            i, j = rng.sample(range(len(batch.rows)), 2)
            batch.swap(i, j)
        if batch.rows:
            batch.step()
            steps += 1
            # The processor holds state for exactly the rows whose request uses it.
            ours = batch.processors.non_argmax_invariant[-1]
            uses = {i for i, r in enumerate(batch.rows) if r is not None and r.params.extra_args}
            assert set(ours.rows) == uses
    assert steps > 20
    batch.condense()  # the last requests left: their rows must be dropped
    update = batch.builder.get_and_reset(len(batch.rows))
    for p in batch.processors.all:
        p.update_state(update)
    assert batch.processors.non_argmax_invariant[-1].rows == {}


def test_to_sampling_params_carries_rules_and_scores():
    plan = to_generation_plan(
        {"typical_p": 0.5, "temperature": 0.7, "repetition_penalty": 1.2, "output_scores": True},
        prompt_tokens=5,
        prefix_tokens=0,
        special=SPECIAL,
        max_model_len=512,
    )
    params = to_sampling_params(plan.sampling)
    assert params.logprobs == 0
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (
        1.0,
        0,
        1.0,
        1.0,
    )
    TransformersRulesProcessor.validate_params(params)  # what the front end checks
    params.extra_args["kaito_transformers_rules"]["colour"] = 1
    with pytest.raises(ValueError):
        TransformersRulesProcessor.validate_params(params)


def test_min_length_goes_to_vllms_builtin_when_the_engine_bans_the_same_eos():
    # The engine's own EOS ids: the tokenizer's and generation_config's (here 2 and [2, 9]).
    llm = SimpleNamespace(
        renderer=SimpleNamespace(get_eos_token_id=lambda: 2),
        model_config=SimpleNamespace(try_get_generation_config=lambda: {"eos_token_id": [2, 9]}),
    )
    assert engine_eos_ids(llm) == {2, 9}

    def params(kwargs, eos_ids):
        spec = to_generation_plan(
            kwargs, prompt_tokens=5, prefix_tokens=0, special=SPECIAL, max_model_len=512
        ).sampling
        return to_sampling_params(spec, vllm_eos_ids=eos_ids)

    builtin = params({"min_new_tokens": 4, "eos_token_id": [2, 9]}, frozenset({2, 9}))
    assert builtin.min_tokens == 4 and not builtin.extra_args
    # The engine would also ban 9, which this client does not: our processor, vLLM's off.
    ours = params({"min_new_tokens": 4, "eos_token_id": 2}, frozenset({2, 9}))
    assert ours.min_tokens == 0
    assert ours.extra_args["kaito_transformers_rules"]["eos_token_ids"] == [2]
