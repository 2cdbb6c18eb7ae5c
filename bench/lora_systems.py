"""Our server with LoRA adapters, for bench/run.py: what adapters cost against ``ours``.

    .venv/bin/python -m bench --profile full --interleave --compiled --levels 32 \\
        --systems ours,ours-lora,ours-lora-spread,ours-merged

- ``ours-lora``: 4 adapters with per-request selection on (vLLM's multi-LoRA); every
  request runs the combined default, as Kaito's /chat does.
- ``ours-lora-spread``: the same server kind, requests cycle ``model`` over the 4
  adapters, so every batch mixes them.
- ``ours-merged``: the same adapters with KAITO_PER_REQUEST_ADAPTERS=false: the combined
  default merged into the weights at start-up, no LoRA in the engine.

The adapters are made once per run with PEFT from the benchmarked model (random,
non-zero weights, ranks 8 and 16, attention and MLP projections), in a temporary
directory removed at exit; nothing is downloaded.
"""

import atexit
import functools
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.systems import OurServer, System
from bench.workload import Request, chat_payload

# name, rank, target modules: the mix of ranks and modules a fleet's adapters have.
ADAPTERS = (
    ("a0", 8, ["q_proj", "v_proj"]),
    ("a1", 16, ["q_proj", "o_proj"]),
    ("a2", 8, ["k_proj", "down_proj"]),
    ("a3", 16, ["v_proj", "up_proj"]),
)


def _temporary_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def made_adapters(model: str) -> Path:
    """The directory holding the 4 adapters for ``model`` (made on first use)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = _temporary_dir("bench-adapters-")
    for seed, (name, rank, targets) in enumerate(ADAPTERS):
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=rank / 4, target_modules=targets, init_lora_weights=False
        )
        get_peft_model(base, config).save_pretrained(root / name)
    return root


class LoRAServer(OurServer):
    key = "ours-lora"
    title = "our /chat, 4 LoRA adapters, every request on the combined default"

    def start(self, tag: str) -> None:
        self.extra_env = {
            **self.extra_env,
            "KAITO_ADAPTERS_DIR": str(made_adapters(self.config.model)),
        }
        super().start(tag)


class LoRASpreadServer(LoRAServer):
    key = "ours-lora-spread"
    title = "our /chat, 4 LoRA adapters, requests spread over them by `model`"

    def __init__(self, config: Any, url: str | None = None) -> None:
        super().__init__(config, url)
        self._next = itertools.cycle([name for name, _, _ in ADAPTERS])

    def build(self, request: Request) -> tuple[str, dict[str, Any]]:
        return "/chat", {**chat_payload(request), "model": next(self._next)}


class MergedServer(LoRAServer):
    key = "ours-merged"
    title = "our /chat, 4 LoRA adapters merged into the weights (KAITO_PER_REQUEST_ADAPTERS=false)"

    def start(self, tag: str) -> None:
        self.extra_env = {
            **self.extra_env,
            "KAITO_PER_REQUEST_ADAPTERS": "false",
            # The merged copy of the model goes under the cache, removed at exit.
            "XDG_CACHE_HOME": str(_temporary_dir("bench-merged-cache-")),
        }
        super().start(tag)


LORA_SYSTEMS: dict[str, type[System]] = {
    cls.key: cls for cls in (LoRAServer, LoRASpreadServer, MergedServer)
}
