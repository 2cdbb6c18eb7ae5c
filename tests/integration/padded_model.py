"""The default model, widened so that tensor parallel can split it, computing the same
function.

SmolLM2-135M has 9 attention heads over 3 key/value heads; vLLM splits heads evenly
over tensor-parallel ranks, so it refuses tensor parallel 2 ("Total number of attention
heads (9) must be divisible by tensor parallel size (2)"). Here the key/value heads are
padded up to a multiple of the tensor parallel size, each new key/value head with its
group of query heads (GQA keeps query head i on key/value head i // group). Every new
weight is zero, and so are the new heads' columns of o_proj: what they attend to is
multiplied by zero before it reaches the residual stream, so the model's output is the
original's. ``check_same_function`` verifies that with transformers.
"""

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROMPT = "The capital of France is"


def pad_heads(src: Path, dst: Path, tensor_parallel_size: int) -> dict[str, int]:
    """Writes the widened copy of the model at ``src`` to ``dst``; returns the new head
    counts."""
    config = json.loads((src / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    group = heads // kv_heads
    new_kv = math.ceil(kv_heads / tensor_parallel_size) * tensor_parallel_size
    new_heads = new_kv * group
    extra_q, extra_kv = (new_heads - heads) * head_dim, (new_kv - kv_heads) * head_dim

    tensors = load_file(str(src / "model.safetensors"))
    padded = {}
    for name, t in tensors.items():
        if name.endswith("self_attn.q_proj.weight"):
            t = torch.cat([t, t.new_zeros(extra_q, t.shape[1])])
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            t = torch.cat([t, t.new_zeros(extra_kv, t.shape[1])])
        elif name.endswith("self_attn.o_proj.weight"):
            t = torch.cat([t, t.new_zeros(t.shape[0], extra_q)], dim=1)
        padded[name] = t.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(padded, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config.update(num_attention_heads=new_heads, num_key_value_heads=new_kv, head_dim=head_dim)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.name not in {"config.json", "model.safetensors"}:
            shutil.copy2(f, dst / f.name)
    return {"num_attention_heads": new_heads, "num_key_value_heads": new_kv}


def check_same_function(original: Path, padded: Path) -> float:
    """Largest absolute difference of the next-token logits of the two models on one
    prompt (float32, transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(original)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    logits = []
    for path in (original, padded):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(ids).logits[0, -1])
        del model
    return float((logits[0] - logits[1]).abs().max())
