"""What every system is asked to do: the committed prompts and a fixed amount of output.

Each request generates exactly ``max_new_tokens`` tokens (min = max), greedily, so every
system does the same work whatever the model would have said. Each request's text
starts with a short tag unique to (repetition, level, index): vLLM's prefix cache
would otherwise serve repeated prompts from cache after the warm-up, which a real
workload of distinct prompts does not get (the transformers baseline has no such
cache). Systems get the same tagged texts in the same order, so request ``i`` of a
level is the same request everywhere.
"""

import json
from dataclasses import dataclass
from pathlib import Path

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.jsonl"


@dataclass(frozen=True)
class Request:
    prompt_id: int
    text: str
    max_new_tokens: int


@dataclass(frozen=True)
class Workload:
    prompts: list[str]
    max_new_tokens: int

    def requests(self, tag: str, count: int) -> list[Request]:
        """``count`` requests cycling over the prompts, each text tagged with ``tag`` and
        its index."""
        return [
            Request(
                prompt_id=i % len(self.prompts),
                text=f"[{tag}-{i}] {self.prompts[i % len(self.prompts)]}",
                max_new_tokens=self.max_new_tokens,
            )
            for i in range(count)
        ]


# The throughput workload: chat-style requests of three lengths.
WORKLOAD_KINDS = ("short", "medium", "long")


def load_prompts(path: Path = PROMPTS_FILE, kinds: tuple[str, ...] = WORKLOAD_KINDS) -> list[str]:
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row["prompt"] for row in rows if row["kind"] in kinds]


def continuation_prompts() -> list[str]:
    """Short openings the model continues (not finished questions, which a small instruct
    model may answer with an immediate end of turn): the parity tests and the beam and
    processor benchmarks share them."""
    return load_prompts(kinds=("continuation",))


def chat_payload(request: Request) -> dict[str, object]:
    """Our /chat and the Kaito baseline get the same transformers-style payload."""
    n = request.max_new_tokens
    return {
        "prompt": request.text,
        "generate_kwargs": {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False},
    }


def completions_payload(
    request: Request, model: str, eos_token_id: int | None
) -> dict[str, object]:
    """vLLM's /v1/completions with the sampling parameters our server derives from
    ``chat_payload``: greedy, min = max tokens, stop only on the eos id (masked by
    min_tokens anyway), ignore the model's other EOS ideas."""
    n = request.max_new_tokens
    payload: dict[str, object] = {
        "model": model,
        "prompt": request.text,
        "max_tokens": n,
        "min_tokens": n,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if eos_token_id is not None:
        payload["stop_token_ids"] = [eos_token_id]
    return payload
