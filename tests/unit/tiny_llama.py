"""A tiny random Llama in float64: an oracle for beam search rules that runs in seconds.

Float64 weights keep transformers' cached logits and logits recomputed per beam equal to
far below float32's resolution, so a difference against transformers is a rule, not
rounding.
"""

from typing import Any

VOCAB = 40


def tiny_llama(seed: int) -> Any:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=3,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).to(torch.float64).eval()


def top_logprobs(model: Any, prompt: list[int], beams: list[list[int]], k: int) -> list[Any]:
    """Each beam's k most likely next tokens with their log-probs, recomputed from the
    whole sequence (as the vLLM loop gets them), float32 as transformers keeps scores."""
    import torch

    ids = torch.tensor([prompt + b for b in beams])
    with torch.no_grad():
        logits = model(ids).logits[:, -1, :].to(torch.float32)
    values, indices = torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
    pairs = zip(indices.tolist(), values.tolist(), strict=True)
    return [list(zip(i, v, strict=True)) for i, v in pairs]


def transformers_beams(
    model: Any, prompt: list[int], spec: Any, max_new: int, min_new: int, eos: list[int]
) -> tuple[Any, list[list[int]]]:
    """transformers' beam search on ``prompt`` (scores included) and each returned
    sequence's generated tokens, cut where its beam ended."""
    import torch

    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        num_beams=spec.num_beams,
        length_penalty=spec.length_penalty,
        early_stopping=spec.early_stopping,
        num_return_sequences=spec.num_return_sequences,
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        eos_token_id=eos,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    lengths = (out.beam_indices >= 0).sum(dim=-1).tolist()
    rows = out.sequences[:, len(prompt) :].tolist()
    return out, [row[:n] for row, n in zip(rows, lengths, strict=True)]
