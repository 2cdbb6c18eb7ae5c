"""The raw engine, offline: ``vllm.LLM`` in its own process, driven over stdin/stdout.

This is the ceiling for any server on this machine: no HTTP, no event loop, no JSON.
The harness starts it once per repetition, sends it one JSON command per line, and
reads one JSON reply per line (prefixed with ``@@BENCH@@``, because vLLM logs to stdout
as well).

A level runs ``LLM.generate``'s own loop (``llm_engine.add_request`` + ``step`` until
done, see ``vllm/entrypoints/common/offline.py``) but keeps exactly ``concurrency``
requests in flight, adding the next one as soon as one finishes, like the closed-loop
clients of the HTTP systems. Each request's latency runs from tokenizing its text to
its final output. The sampling parameters are vLLM's own for the same work as the
/chat payload (greedy, exactly N tokens, the eos id as stop id), as vLLM's server gets
them: the engine without anything of ours, the ceiling for our server.

    python -m bench.offline_engine --model DIR [--enforce-eager]
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.workload import Request

MARK = "@@BENCH@@ "


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


def tokens_input(ids: list[int]) -> Any:
    """The rendered-prompt form the engine takes without re-processing raw prompts."""
    from vllm.inputs.engine import tokens_input as make

    return make(ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = parser.parse_args()

    # Imports after the env vars the harness set; vLLM reads them at import/spawn.
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    llm = LLM(
        model=args.model,
        dtype="float32",
        enforce_eager=args.enforce_eager,
        # The servers' scheduler limits (vLLM's defaults for an online server on CPU),
        # not LLM's larger offline defaults: same scheduler, same batches.
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    params_cache: dict[int, Any] = {}

    def params_for(request: Any) -> Any:
        """vLLM's own parameters for the work a /chat request asks for: greedy, exactly
        max_new_tokens tokens (built-in min_tokens), the eos id as the only stop id;
        no per-step detokenizing and only the final output, the cheapest way to get the
        tokens out."""
        n = request.max_new_tokens
        if n not in params_cache:
            params_cache[n] = SamplingParams(
                temperature=0.0,
                max_tokens=n,
                min_tokens=n,
                ignore_eos=True,
                stop_token_ids=[] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id],
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
        return params_cache[n]

    reply({"ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("cmd") == "quit":
            break
        level = ClosedLoop(
            engine,
            tokenizer,
            params_for,
            [Request(**r) for r in command["requests"]],
            int(command["concurrency"]),
        )
        records, elapsed = level.run(float(command["max_seconds"]), float(command["grace_seconds"]))
        reply({"records": records, "elapsed_s": elapsed})


class ClosedLoop:
    """One level: ``concurrency`` requests in flight until all are done or cut off."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        params_for: Callable[[Any], Any],
        requests: list[Any],
        concurrency: int,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.params_for = params_for
        self.requests = requests
        self.concurrency = concurrency
        self.in_flight: dict[str, tuple[int, float]] = {}
        self.records: list[dict[str, Any]] = []
        self.next_index = 0
        self.t_level = time.perf_counter()
        self.deadline_launch = self.t_level

    def _record(self, index: int, start: float, now: float, tokens: int, status: str) -> None:
        self.records.append(
            {
                "index": index,
                "prompt_id": self.requests[index].prompt_id,
                "start_s": start - self.t_level,
                "latency_s": now - start,
                "output_tokens": tokens,
                "status": status,
            }
        )

    def _fill(self) -> None:
        while (
            self.next_index < len(self.requests)
            and len(self.in_flight) < self.concurrency
            and time.perf_counter() < self.deadline_launch
        ):
            index = self.next_index
            self.next_index += 1
            request = self.requests[index]
            start = time.perf_counter()
            ids = self.tokenizer.encode(request.text)
            self.engine.add_request(str(index), tokens_input(ids), self.params_for(request))
            self.in_flight[str(index)] = (index, start)

    def run(self, max_seconds: float, grace_seconds: float) -> tuple[list[dict[str, Any]], float]:
        self.t_level = time.perf_counter()
        self.deadline_launch = self.t_level + max_seconds
        deadline_hard = self.deadline_launch + grace_seconds
        last_done = last_progress = self.t_level
        cut_off = False
        self._fill()
        while self.in_flight:
            for output in self.engine.step():
                if not output.finished or output.request_id not in self.in_flight:
                    continue
                index, start = self.in_flight.pop(output.request_id)
                last_done = time.perf_counter()
                tokens = sum(len(c.token_ids) for c in output.outputs)
                self._record(index, start, last_done, tokens, "ok")
            self._fill()
            now = time.perf_counter()
            if now - last_progress >= 2:
                last_progress = now
                done = sum(r["output_tokens"] for r in self.records)
                reply({"progress": len(self.records), "tokens": done})
            if now > deadline_hard:
                cut_off = True
                self.engine.abort_request(list(self.in_flight))
                for index, start in self.in_flight.values():
                    self._record(index, start, now, 0, "cancelled")
                self.in_flight.clear()
        # Drain whatever an abort left behind so the next level starts clean.
        while self.engine.has_unfinished_requests():
            self.engine.step()
        end = time.perf_counter() if cut_off else last_done
        self.records.sort(key=lambda r: r["index"])
        return self.records, end - self.t_level


if __name__ == "__main__":
    main()
