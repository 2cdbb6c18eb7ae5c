"""The default adapter merged into the model's weights, for a server that serves only it.

With KAITO_PER_REQUEST_ADAPTERS=false every request runs Kaito's combined adapter, so
nothing needs the base weights on their own: PEFT's ``merge_and_unload`` folds the
combination into them once, at start-up, and both engines load the result as an
ordinary model. vLLM then serves without LoRA: on CPU it keeps torch.compile (LoRA
turns it off there), on a GPU it skips the LoRA kernels (bench/bench_lora.py measures
it; docs/ADAPTERS.md).

The merge runs in the dtype the engines serve in (float32 on CPU), so the merged weight
is ``W + scale * B @ A`` rounded once to that dtype; the integration tests check greedy
output against PEFT's unmerged adapter token for token.
"""

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A finished merge holds this file; a directory without it is an interrupted one.
MODEL_CONFIG = "config.json"


def merged_model_dir(cache_root: Path, model: str, combined: Path, dtype: str) -> Path:
    """Where the merge of ``combined`` into ``model`` is kept. The name changes with the
    combination's content (its directory is named after a hash of it), the model and the
    dtype, so a restart reuses a merge only when it would build the same one."""
    key = "\0".join([model, _model_identity(model), combined.name, dtype])
    return cache_root / "kaito-merged" / f"merged-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _model_identity(model: str) -> str:
    """A local model directory's file names, sizes and times (a changed checkpoint under
    the same path gets a new merge); a hub id is its own identity."""
    root = Path(model)
    if not root.is_dir():
        return ""
    return ";".join(
        f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in sorted(root.rglob("*"))
        if p.is_file()
    )


def build_merged(model: str, combined: Path, torch_dtype: Any, out: Path) -> Path:
    """Saves ``model`` with the adapter at ``combined`` merged into it (PEFT's
    merge_and_unload) at ``out``, with the model's tokenizer; returns ``out``. A finished
    merge already there is reused."""
    if (out / MODEL_CONFIG).is_file():
        log.info("reusing the merged model at %s", out)
        return out
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(base, str(combined)).merge_and_unload()
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".staging-"))
    try:
        merged.save_pretrained(str(staging))
        AutoTokenizer.from_pretrained(model).save_pretrained(str(staging))
        if not (out / MODEL_CONFIG).is_file():  # another replica may have finished first
            shutil.rmtree(out, ignore_errors=True)  # an interrupted merge's leftovers
            try:
                os.replace(staging, out)
            except OSError:
                if not (out / MODEL_CONFIG).is_file():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("merged %s into %s: %s", combined.name, model, out)
    return out
