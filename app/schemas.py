"""Request and response schemas of POST /chat: Kaito's contract, field for field."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from param_mapping import KAITO_DEFAULTS

_D = KAITO_DEFAULTS


class GenerateKwargs(BaseModel):
    """transformers ``generate`` arguments, with Kaito's defaults.

    Unknown names are refused with a 400 naming them (transformers raises on unused
    kwargs too); types that do not parse are a 422.
    """

    model_config = ConfigDict(extra="allow")

    max_length: int = Field(
        _D["max_length"],
        description="Total tokens, prompt included (transformers decoder-only rule).",
    )
    min_length: int = Field(_D["min_length"], description="Minimum total tokens, prompt included.")
    do_sample: bool = Field(_D["do_sample"], description="Sample (true) or greedy search (false).")
    early_stopping: bool | Literal["never"] = Field(
        _D["early_stopping"], description="Beam search stopping rule."
    )
    num_beams: int = Field(_D["num_beams"], description="Beam width; 1 means no beam search.")
    num_beam_groups: int = Field(
        _D["num_beam_groups"], description="Groups for diverse beam search."
    )
    diversity_penalty: float = Field(
        _D["diversity_penalty"], description="Penalty between beam groups."
    )
    temperature: float = Field(_D["temperature"], description="Softmax temperature when sampling.")
    top_k: int = Field(
        _D["top_k"], description="Keep the k most likely tokens when sampling; 0 disables."
    )
    top_p: float = Field(_D["top_p"], description="Nucleus sampling mass in (0, 1].")
    typical_p: float = Field(
        _D["typical_p"], description="Locally typical sampling mass in (0, 1]."
    )
    repetition_penalty: float = Field(
        _D["repetition_penalty"],
        description="CTRL repetition penalty over prompt and output; 1 is off.",
    )
    length_penalty: float = Field(_D["length_penalty"], description="Beam score length exponent.")
    no_repeat_ngram_size: int = Field(
        _D["no_repeat_ngram_size"], description="Ban repeating n-grams of this size; 0 is off."
    )
    encoder_no_repeat_ngram_size: int = Field(
        _D["encoder_no_repeat_ngram_size"],
        description="Ban the prompt's n-grams of this size from the output; 0 is off.",
    )
    bad_words_ids: list[list[int]] | list[int] | None = Field(
        _D["bad_words_ids"],
        description="Token-id sequences that must not be generated, e.g. [[12], [34, 56]].",
    )
    num_return_sequences: int = Field(
        _D["num_return_sequences"],
        description="Sequences to return (sampling only); Result joins them.",
    )
    output_scores: bool = Field(_D["output_scores"], description="Accepted for compatibility.")
    return_dict_in_generate: bool = Field(
        _D["return_dict_in_generate"], description="Accepted for compatibility."
    )
    pad_token_id: int | None = Field(
        _D["pad_token_id"], description="Padding id; no effect on one prompt."
    )
    eos_token_id: int | list[int] | None = Field(
        _D["eos_token_id"], description="End-of-sequence id(s); default: the tokenizer's."
    )
    forced_bos_token_id: int | None = Field(
        _D["forced_bos_token_id"], description="Token forced first when the sequence has length 1."
    )
    forced_eos_token_id: int | None = Field(
        _D["forced_eos_token_id"], description="Token forced at the step that reaches max_length."
    )
    remove_invalid_values: bool | None = Field(
        _D["remove_invalid_values"], description="Replace NaN/inf logits."
    )
    max_new_tokens: int | None = Field(
        None, description="New tokens to generate; wins over max_length."
    )
    min_new_tokens: int | None = Field(
        None, description="Minimum new tokens; wins over min_length."
    )
    stop_strings: str | list[str] | None = Field(
        None,
        description=(
            "Stop once the output ends with one of these strings "
            "(kept in the output, as transformers does)."
        ),
    )
    use_cache: bool = Field(
        True, description="Accepted for compatibility; no effect on the result."
    )


class ChatMessage(BaseModel):
    role: str = Field(description='Who speaks: "system", "user" or "assistant".')
    content: str = Field(description="What they say.")


class ChatRequest(BaseModel):
    """Kaito's UnifiedRequestModel for the text-generation pipeline."""

    prompt: str | None = Field(
        None, description="Prompt for text generation (required unless messages is given)."
    )
    return_full_text: bool | None = Field(
        True, description="Start the result with the prompt (true) or return only the added text."
    )
    clean_up_tokenization_spaces: bool | None = Field(
        False, description="Clean up extra spaces when decoding."
    )
    prefix: str | None = Field(
        None, description="Text prepended to the prompt before tokenizing; not echoed back."
    )
    handle_long_generation: str | None = Field(
        None,
        description=(
            'null, or "hole" to drop the oldest prompt tokens when prompt + new tokens '
            "exceed the model length."
        ),
    )
    generate_kwargs: GenerateKwargs | None = Field(
        None, description="transformers generate arguments; absent means Kaito's defaults."
    )
    messages: list[ChatMessage] | None = Field(
        None,
        description=(
            "Conversation, instead of prompt: the model's chat template builds the prompt "
            "(with the generation prompt) and Result is the assistant's reply only "
            "(docs/STREAMING.md)."
        ),
    )
    model: str | None = Field(
        None,
        description="Which LoRA adapter to run with (docs/ADAPTERS.md): an adapter's name "
        "runs that adapter alone, the base model's served name runs no adapter; absent: "
        "the default, Kaito's combination of every adapter (the base model when there are "
        "none). An unknown name is a 404.",
    )
    stream: bool | None = Field(
        False,
        description=(
            "Answer with server-sent events: one per token, then the final result, "
            "then [DONE] (docs/STREAMING.md); null means false."
        ),
    )

    def generate_kwargs_given(self) -> dict[str, Any]:
        """Only what the client sent (extras included); the mapping adds the defaults."""
        if self.generate_kwargs is None:
            return {}
        return self.generate_kwargs.model_dump(exclude_unset=True)


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt the engine saw (prefix included).")
    completion_tokens: int = Field(description="Tokens generated, all sequences together.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class TokenScore(BaseModel):
    id: int = Field(description="The generated token's id.")
    text: str = Field(
        description="Its text (special tokens written out). A token that ends inside a "
        'multi-byte character has "" and the next one carries the character, so the texts '
        "join into the decoded output."
    )
    logprob: float | None = Field(
        description="Its log-probability under the processed distribution it was chosen "
        "from (after penalties, bans and warpers): transformers' compute_transition_scores "
        "with normalize_logits=True. null if not finite."
    )


class Sequence(BaseModel):
    text: str = Field(description="This sequence's generated_text, as the pipeline returns it.")
    finish_reason: str | None = Field(
        description='"stop" (eos / stop string), "length" (max reached) or null.'
    )
    generated_tokens: int = Field(description="Tokens generated for this sequence.")
    tokens: list[TokenScore] | None = Field(
        None,
        description="Only with generate_kwargs.output_scores or return_dict_in_generate: "
        "one entry per generated token, in order (docs/SCORES.md).",
    )
    sequence_score: float | None = Field(
        None,
        description="Only with scores: the sum of the tokens' log-probabilities, i.e. the "
        "sequence's log-probability under the processed distributions; null if any "
        "token's is null. Beam search: transformers' sequences_scores, that sum divided by "
        "length ** length_penalty.",
    )


class ChatResponse(BaseModel):
    Result: str = Field(
        description="Kaito's result: every returned sequence's generated_text, joined."
    )
    sequences: list[Sequence] = Field(description="One entry per returned sequence.")
    usage: Usage
    backend: str = Field(description='Which engine served the request ("vllm" or "hf").')


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong, naming the parameter, rule and value.")
    parameter: str | None = Field(None, description="The offending parameter, when there is one.")
