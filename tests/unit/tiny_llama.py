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
