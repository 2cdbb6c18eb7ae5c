"""The processor's rules against transformers itself, at the logits level.

The oracle is transformers' ``generate`` on a tiny random Llama (vocabulary 48, so n-grams
repeat and bans fire often): with ``output_logits`` and ``output_scores`` it hands back,
for every step, the raw logits it started from and the processed scores it chose from.
Replaying the raw logits through our rules (as routed for vLLM) must give the processed
scores bit for bit. No vLLM here; tests/unit/test_processors_vllm.py runs vLLM's sampler.
"""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    InfNanRemoveLogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from app.engines.processors import EXTRA_ARGS_KEY
from app.engines.processors.routing import processor_rules
from app.engines.processors.rules import (
    NgramIndex,
    RowState,
    RuleArgs,
    Warpers,
    remove_inf_nan,
    warp,
)
from param_mapping import SpecialTokens, to_generation_plan

VOCAB = 48
EOS, BOS = 2, 1
SPECIAL = SpecialTokens(eos_token_id=EOS, pad_token_id=EOS, bos_token_id=BOS, vocab_size=VOCAB)

# transformers warns about min lengths above the maximum, which some cases set on purpose.
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
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def replay_through_rules(
    model: LlamaForCausalLM, prompt: list[int], kwargs: dict, seed: int = 0
) -> tuple[int, int]:
    """Runs transformers ``generate``, then our rules on its raw logits, step by step.

    Returns (steps compared, steps where a rule changed something). Asserts each step's
    processed row equals transformers' bit for bit (NaN-aware).
    """
    plan = to_generation_plan(
        kwargs, prompt_tokens=len(prompt), prefix_tokens=0, special=SPECIAL, max_model_len=512
    )
    spec = plan.sampling
    overrides, extra = processor_rules(spec)
    rules = RuleArgs.parse(extra[EXTRA_ARGS_KEY]) if EXTRA_ARGS_KEY in extra else RuleArgs()
    chain = rules.warpers is not None
    sampling = spec.temperature > 0
    assert not sampling or chain, "replay covers vLLM-free chains only; see test_processors_vllm"

    hf_kwargs = {
        "do_sample": sampling,
        "max_new_tokens": spec.max_tokens,
        "eos_token_id": EOS,
        "pad_token_id": EOS,
        **{k: v for k, v in kwargs.items() if k not in ("max_length", "min_length")},
    }
    if "min_length" in kwargs:
        hf_kwargs["min_length"] = kwargs["min_length"]
    ids = torch.tensor([prompt])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
            **hf_kwargs,
        )
    output: list[int] = []
    state = RowState(rules, prompt, output)
    changed = 0
    for step, (raw, expected) in enumerate(zip(out.logits, out.scores, strict=True)):
        row = raw[0].clone()
        for token, bias in (spec.logit_bias or {}).items():  # vLLM's LogitBias, before us
            row[token] += bias
        got = state.process(row.clone())
        assert torch.equal(got.isnan(), expected[0].isnan()), f"step {step}: NaNs differ"
        assert torch.equal(got.nan_to_num(0.0), expected[0].nan_to_num(0.0)), f"step {step}"
        changed += int(not torch.equal(expected[0].nan_to_num(0.0), raw[0]))
        output.append(int(out.sequences[0, len(prompt) + step]))
    return len(out.scores), changed


PROMPT = [5, 6, 7, 5, 6, 8, 9, 5, 6, 7, 10, 11]

GREEDY_CASES = [
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.6},
    {"no_repeat_ngram_size": 1},
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 3},
    {"no_repeat_ngram_size": 200},  # longer than anything: never fires
    {"encoder_no_repeat_ngram_size": 1},
    {"encoder_no_repeat_ngram_size": 2},
    {"encoder_no_repeat_ngram_size": 3},
    # one-token words (vLLM logit_bias), the eos entry transformers drops, multi-token words
    # whose prefix lies in the prompt ([10, 11] ends it) and in the output.
    {"bad_words_ids": [[36], [2], [10, 11, 44], [11, 44], [44, 29], [6, 7, 5]]},
    {"bad_words_ids": [[7, 40], [40, 40, 40]]},
    {"min_new_tokens": 6},
    {"min_length": len(PROMPT) + 4},
    {"forced_eos_token_id": 3},
    {"forced_eos_token_id": EOS, "min_new_tokens": 30},  # forced wins over the EOS ban
    {"remove_invalid_values": True, "no_repeat_ngram_size": 1, "repetition_penalty": 1.5},
    {
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 2,
        "encoder_no_repeat_ngram_size": 3,
        "bad_words_ids": [[36], [44, 29], [5, 6, 9]],
        "min_new_tokens": 4,
        "forced_eos_token_id": 4,
        "remove_invalid_values": True,
    },
]


@pytest.mark.parametrize("kwargs", GREEDY_CASES, ids=lambda k: ",".join(k))
@pytest.mark.parametrize("new_tokens", [1, 16])
def test_greedy_rules_match_transformers_bit_for_bit(tiny_model, kwargs, new_tokens):
    steps, _ = replay_through_rules(
        tiny_model, PROMPT, {"do_sample": False, "max_new_tokens": new_tokens, **kwargs}
    )
    assert steps >= 1


def test_forced_bos_applies_only_at_length_one(tiny_model):
    kwargs = {"do_sample": False, "max_new_tokens": 6, "forced_bos_token_id": 9}
    replay_through_rules(tiny_model, [7], kwargs)  # cur_len == 1 at the first step
    replay_through_rules(tiny_model, [7, 8], kwargs)  # never


def test_the_rules_do_fire_in_these_cases(tiny_model):
    """Guards the oracle: identical rows would prove nothing."""
    kwargs = {"do_sample": False, "max_new_tokens": 16, "no_repeat_ngram_size": 1}
    _, changed = replay_through_rules(tiny_model, PROMPT, kwargs)
    assert changed >= 10


SAMPLED_CASES = [
    {"typical_p": 0.5},
    {"typical_p": 0.9, "temperature": 0.7},
    {"typical_p": 0.3, "temperature": 1.6, "top_k": 20},
    {"typical_p": 0.8, "top_p": 0.9},
    {"typical_p": 0.95, "temperature": 0.8, "top_k": 12, "top_p": 0.85},
    {
        "typical_p": 0.7,
        "temperature": 1.2,
        "top_k": 30,
        "top_p": 0.95,
        "repetition_penalty": 1.3,
        "no_repeat_ngram_size": 2,
        "bad_words_ids": [[36], [5, 6, 9]],
        "min_new_tokens": 3,
        "forced_eos_token_id": 4,
        "remove_invalid_values": True,
    },
]


@pytest.mark.parametrize("kwargs", SAMPLED_CASES, ids=lambda k: ",".join(k))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_typical_p_chain_matches_transformers_bit_for_bit(tiny_model, kwargs, seed):
    full = {"do_sample": True, "max_new_tokens": 12, "top_k": 0, **kwargs}
    replay_through_rules(tiny_model, PROMPT, full, seed=seed)


# --- warper parity on random logits (the distribution, after softmax) -------------------


def transformers_warpers(temperature: float, top_k: int, top_p: float, typical_p: float):
    """The warpers transformers' _get_logits_processor builds for these values."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        out.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if typical_p < 1.0:
        out.append(TypicalLogitsWarper(mass=typical_p, min_tokens_to_keep=1))
    return out


@pytest.mark.parametrize("typical_p", [0.05, 0.2, 0.5, 0.9, 0.999])
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.5, 0, 1.0),
        (1.0, 40, 1.0),
        (1.0, 0, 0.8),
        (0.6, 100, 0.9),
        (2.0, 5, 0.5),
    ],
)
def test_typical_warper_distribution_equals_transformers(typical_p, temperature, top_k, top_p):
    generator = torch.Generator().manual_seed(int(typical_p * 1000) + top_k)
    for scale in (0.5, 3.0, 12.0):  # flat to peaked distributions
        logits = torch.randn(4, 32000, generator=generator) * scale
        logits[1, :100] = -math.inf  # already-banned tokens, as after a processor
        input_ids = torch.zeros(4, 1, dtype=torch.long)
        warpers = Warpers(temperature, top_k, top_p, typical_p)
        expected = transformers_warpers(temperature, top_k, top_p, typical_p)(
            input_ids, logits.clone()
        )
        ours = torch.stack([warp(row.unsqueeze(0), warpers)[0] for row in logits.clone()])
        diff = (ours.softmax(-1) - expected.softmax(-1)).abs().max().item()
        assert diff < 1e-5
        assert torch.equal(ours, expected)  # in fact bit for bit


def test_inf_nan_removal_equals_transformers():
    scores = torch.tensor([[1.0, math.inf, -math.inf, math.nan, -2.5, 0.0]])
    expected = InfNanRemoveLogitsProcessor()(torch.zeros(1, 1, dtype=torch.long), scores.clone())
    assert torch.equal(remove_inf_nan(scores.clone()), expected)


# --- state over a live output list ------------------------------------------------------


def test_state_follows_the_live_output_list_and_rebuilds_when_it_shrinks():
    output: list[int] = []
    state = RowState(RuleArgs(no_repeat_ngram_size=2), [1, 2, 3], output)
    row = torch.zeros(10)
    output.extend([1])  # sequence 1 2 3 1: bigram (1, 2) seen, so 2 is banned after 1
    assert state.process(row.clone())[2] == -math.inf
    output.extend([4])  # after 4 nothing is banned
    assert torch.isfinite(state.process(row.clone())).all()
    # vLLM rewrote the list (e.g. discarded tokens): the state must follow, not go stale.
    output[:] = [1]
    assert state.process(row.clone())[2] == -math.inf
    output[:] = [3, 1]
    assert state.process(row.clone())[2] == -math.inf


def test_state_ignores_async_placeholders_and_out_of_range_ids():
    output = [7, -1]
    state = RowState(RuleArgs(no_repeat_ngram_size=1, repetition_penalty=2.0), [500, 3], output)
    out = state.process(torch.ones(10))
    assert state.generated == 1
    assert out[3] == -math.inf and out[7] == -math.inf
    assert torch.isfinite(out[[0, 1, 2, 4, 5, 6, 8, 9]]).all()


def test_forced_token_outside_the_row_is_ignored():
    state = RowState(RuleArgs(forced_bos_token_id=99), [1], [])
    assert torch.equal(state.process(torch.ones(10)), torch.ones(10))


def test_ngram_index_verifies_hash_hits():
    tokens = [1, 2, 3, 1, 2, 4]
    index = NgramIndex(3, tokens)
    index.extend()
    assert index.followers([1, 2]) == {3, 4}
    assert index.followers([2, 1]) == set()
    tokens.extend([9, 1, 2, 5])
    index.extend()
    assert index.followers([1, 2]) == {3, 4, 5}


# --- parsing what arrives in extra_args -------------------------------------------------


def test_parse_round_trip():
    raw = {
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 3,
        "bad_words_ids": [[1, 2]],
        "min_new_tokens": 2,
        "eos_token_ids": [2],
        "forced_eos_token_id": 2,
        "forced_eos_at": 9,
        "warpers": {"temperature": 0.5, "top_k": 3, "top_p": 0.9, "typical_p": 0.4},
    }
    args = RuleArgs.parse(raw)
    assert args.bad_words_ids == ((1, 2),) and args.forced_eos_at == 9
    assert args.warpers == Warpers(0.5, 3, 0.9, 0.4)


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"colour": 1},
        {"repetition_penalty": 0},
        {"repetition_penalty": math.inf},
        {"no_repeat_ngram_size": -1},
        {"no_repeat_ngram_size": True},
        {"no_repeat_ngram_size": 1 << 30},
        {"bad_words_ids": [[]]},
        {"bad_words_ids": [[1, -2]]},
        {"bad_words_ids": [1, 2]},
        {"bad_words_ids": [[1, [2]]]},
        {"eos_token_ids": 2},
        {"forced_eos_token_id": 2},
        {"forced_bos_token_id": -1},
        {"remove_invalid_values": 1},
        {"warpers": {"typical_p": 0}},
        {"warpers": {"typical_p": 1.5}},
        {"warpers": {"temperature": 0}},
        {"warpers": {"min_p": 0.1}},
    ],
)
def test_parse_rejects_malformed_values(raw):
    with pytest.raises(ValueError):
        RuleArgs.parse(raw)
