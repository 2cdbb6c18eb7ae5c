"""A Kaito-style /chat server on transformers, kept for benchmarking only.

It is written the way Kaito's original text-generation server worked: FastAPI, one
``transformers.pipeline("text-generation")`` built at start-up, and a synchronous
``def`` route that calls the pipeline and returns ``{"Result": ...}``. FastAPI runs a
sync route in its thread pool, so concurrent requests each run their own ``generate``
on the same model, with no batching between them: that is the behaviour our server
replaces, and what the benchmark compares against.

    python -m bench.baselines.kaito_transformers --model DIR --port 5001

Weights load as float32, the dtype the vLLM systems use on this CPU.
"""

import argparse
import logging
from typing import Any

import torch
import transformers
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger("kaito_baseline")


class GenerateKwargs(BaseModel):
    """Kaito's generate_kwargs defaults; other transformers kwargs pass through."""

    model_config = ConfigDict(extra="allow")

    max_length: int = 200
    min_length: int = 0
    do_sample: bool = True
    early_stopping: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 10
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1


class UnifiedRequestModel(BaseModel):
    prompt: str | None = Field(None, description="Prompt for text generation.")
    return_full_text: bool | None = Field(True, description="Return the prompt too.")
    clean_up_tokenization_spaces: bool | None = Field(False, description="Clean up spaces.")
    prefix: str | None = Field(None, description="Prefix added to the prompt.")
    handle_long_generation: str | None = Field(None, description="Long-prompt strategy.")
    generate_kwargs: GenerateKwargs | None = Field(default_factory=GenerateKwargs)


def create_app(model_dir: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pipeline = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    logger.info("model loaded: %s", model_dir)

    app = FastAPI(title="Kaito-style transformers baseline (benchmark only)")

    @app.get("/")
    def home() -> dict[str, str]:
        return {"message": "Server is running"}

    @app.get("/health")
    def health_check() -> dict[str, str]:
        return {"status": "Healthy"}

    @app.post("/chat")
    def generate_text(request: UnifiedRequestModel) -> dict[str, Any]:
        # A sync def, as in Kaito: FastAPI runs it in a worker thread.
        generate_kwargs = request.generate_kwargs.model_dump() if request.generate_kwargs else {}
        if not request.prompt:
            raise HTTPException(status_code=400, detail="Text generation parameter prompt required")
        sequences = pipeline(
            request.prompt,
            return_full_text=request.return_full_text,
            clean_up_tokenization_spaces=request.clean_up_tokenization_spaces,
            prefix=request.prefix,
            handle_long_generation=request.handle_long_generation,
            **generate_kwargs,
        )
        result = ""
        for seq in sequences:
            result += seq["generated_text"]
        return {"Result": result}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()
