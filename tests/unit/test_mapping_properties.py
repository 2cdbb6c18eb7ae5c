"""Property: whatever a client sends, the mapping either maps it or raises our one
client-error type (a 400) — never anything else (which would be a 500)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from param_mapping import GenerationPlan, ParameterError, SpecialTokens, to_generation_plan
from param_mapping.generate_kwargs import ALL_DEFAULTS
from param_mapping.limits import Limits, check_limits

SPECIAL = SpecialTokens(eos_token_id=2, pad_token_id=2, bos_token_id=1, vocab_size=100)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=2),
    st.text(max_size=8),
    st.just("never"),
    st.just("hole"),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
keys = st.one_of(st.sampled_from(sorted(ALL_DEFAULTS)), st.text(min_size=1, max_size=12))
payloads = st.dictionaries(keys, values, max_size=8)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kwargs=payloads,
    prompt_tokens=st.integers(min_value=1, max_value=300),
    prefix_tokens=st.integers(min_value=0, max_value=5),
    hole=st.sampled_from([None, "hole", "other"]),
)
def test_any_payload_maps_or_raises_parameter_error(kwargs, prompt_tokens, prefix_tokens, hole):
    try:
        check_limits(kwargs, Limits())
        plan = to_generation_plan(
            kwargs,
            prompt_tokens=prompt_tokens,
            prefix_tokens=min(prefix_tokens, prompt_tokens),
            special=SPECIAL,
            max_model_len=256,
            handle_long_generation=hole,
        )
    except ParameterError as err:
        assert err.parameter and err.message
        return
    assert isinstance(plan, GenerationPlan)
    s = plan.sampling
    # What reaches the engine is always within its rules.
    assert s.max_tokens >= 1 and 0 <= s.min_tokens <= s.max_tokens
    assert s.temperature >= 0 and 0 < s.top_p <= 1 and 0 <= s.top_k <= SPECIAL.vocab_size
    assert s.n >= 1
    assert all(0 <= t < SPECIAL.vocab_size for t in s.stop_token_ids)
