"""What the transformers-rules logits processor costs requests that do not use it.

1. End to end. Two offline engines in one run, same model and settings:

   - "ours": the server's configuration, i.e. our processor registered
     (``logits_processors=[PROCESSOR_FQCN]``) and the server's ``logprobs_mode``:
     ``raw_logprobs`` by default, ``processed_logprobs`` with ``--output-scores``
     (KAITO_OUTPUT_SCORES=true);
   - "vanilla": neither.

   Plain requests (greedy, and sampled with Kaito's top_k=10) run on both in rounds of
   one pass each, the order alternating (A B, B A, ...) so drift on a shared machine hits
   both sides alike; the throughput ratio ours / vanilla is printed per workload (goal
   >= 0.97), in wall time and in the engine processes' CPU time. A last, informative pass
   runs the same work on "ours" with every request using rules (n-gram ban, bad words,
   repetition penalty).

2. Because end-to-end ratios on a shared 2-core machine are noisy, a microbenchmark of
   exactly the code that differs: one step of vLLM's ``Sampler`` over a batch of plain
   requests, with vLLM's built-in processors and raw log-probs ("vanilla"), the same plus
   our processor with the server's default raw log-probs ("ours") and with processed
   log-probs ("ours_scores", KAITO_OUTPUT_SCORES=true), in rotating order over many
   iterations.

    .venv/bin/python -m bench.bench_logits_processors            # 32 x 64 tokens, 8 at once
    .venv/bin/python -m bench.bench_logits_processors --requests 8 --tokens 32 --rounds 12
    .venv/bin/python -m bench.bench_logits_processors --skip-end-to-end   # the step only
"""

import argparse
import json
import os
import signal
import statistics
import time
from types import SimpleNamespace
from typing import Any

from bench.workload import continuation_prompts

PROMPTS = continuation_prompts()


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_environment() -> None:
    """The server's CPU settings, with a 1 GiB KV cache (plenty for 8 sequences)."""
    from app.engines.vllm_engine import configure_vllm_environment
    from app.settings import Settings

    configure_vllm_environment(Settings(kv_cache_space_gib=1), on_gpu=False)


# --- 1. end to end ------------------------------------------------------------------------


def build_engine(
    model: str, ours: bool, max_num_seqs: int, eager: bool, output_scores: bool = False
) -> Any:
    from vllm import LLM

    from app.engines.processors import PROCESSOR_FQCN
    from app.engines.vllm_engine import logprobs_mode
    from app.settings import Settings

    extra: dict[str, Any] = {}
    if ours:
        extra = {
            "logits_processors": [PROCESSOR_FQCN],
            "logprobs_mode": logprobs_mode(Settings(output_scores=output_scores)),
        }
    if on_gpu():
        # Two engines share the GPU; the model's own dtype, as the server runs it there.
        extra |= {"gpu_memory_utilization": 0.4, "dtype": "auto"}
    return LLM(
        model=model,
        **({"dtype": "float32"} | extra),
        max_num_seqs=max_num_seqs,
        enforce_eager=eager,
        max_model_len=1024,
        seed=0,
    )


def workloads(tokens: int) -> dict[str, Any]:
    from vllm import SamplingParams

    from app.engines.vllm_engine import to_sampling_params
    from param_mapping import SpecialTokens, to_generation_plan

    # No eos: every request generates exactly `tokens` tokens on both engines.
    common = {"max_tokens": tokens, "ignore_eos": True, "detokenize": False}
    # Rules through the server's own mapping and routing, eos left out for the same reason.
    used = to_generation_plan(
        {
            "do_sample": True,
            "max_new_tokens": tokens,
            "no_repeat_ngram_size": 3,
            "repetition_penalty": 1.2,
            "bad_words_ids": [[13], [30, 198]],
            "eos_token_id": [],
        },
        prompt_tokens=8,
        prefix_tokens=0,
        max_model_len=1024,
        special=SpecialTokens(eos_token_id=2, pad_token_id=2, bos_token_id=1, vocab_size=49152),
    )
    return {
        "greedy": SamplingParams(temperature=0.0, **common),
        # A per-request seed makes vLLM's CUDA sampler fall back from FlashInfer to
        # PyTorch (forward_cuda), which would hide what a GPU run measures.
        "sampled": SamplingParams(
            temperature=1.0, top_k=10, seed=None if on_gpu() else 0, **common
        ),
        "rules": to_sampling_params(used.sampling),
    }


class Engine:
    """An offline LLM and the processes it runs in (engine core and its workers)."""

    def __init__(
        self, model: str, ours: bool, max_num_seqs: int, eager: bool, output_scores: bool
    ) -> None:
        import psutil

        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        self.llm = build_engine(model, ours, max_num_seqs, eager, output_scores)
        self.procs = [p for p in me.children(recursive=True) if p.pid not in before]

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # a helper process that has exited
                pass
        return total

    def timed_pass(self, prompts: list[str], params: Any) -> tuple[float, float]:
        """(generated tokens per wall second, per engine CPU second) for one pass.

        CPU seconds count the engine processes' own work, so they move much less than
        wall time when other jobs share the cores (spin-waits still inflate them).
        """
        cpu0, start = self.cpu_seconds(), time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - start, self.cpu_seconds() - cpu0
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return tokens / wall, tokens / max(cpu, 1e-9)


def end_to_end(args: Any, engines: dict[str, Engine], results: dict[str, Any]) -> None:
    """Rounds of one pass per engine, the order alternating (A B, B A, ...).

    Reported per workload: the ratio of median throughputs, and the median of the
    per-round ratios (each round's two passes ran back to back, so slow drift in the
    machine's load cancels out of it), both in wall and in engine-CPU terms.
    """
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    params = workloads(args.tokens)
    for engine in engines.values():  # warm-up: first passes are slower
        for name in ("greedy", "sampled"):
            engine.timed_pass(prompts[: args.concurrency], params[name])

    for workload in ("greedy", "sampled"):
        wall: dict[str, list[float]] = {"ours": [], "vanilla": []}
        cpu: dict[str, list[float]] = {"ours": [], "vanilla": []}
        for r in range(args.rounds):
            for name in ("ours", "vanilla") if r % 2 == 0 else ("vanilla", "ours"):
                w, c = engines[name].timed_pass(prompts, params[workload])
                wall[name].append(w)
                cpu[name].append(c)
            print(
                f"  {workload:8s} round {r}: ours {wall['ours'][-1]:6.1f} tok/s "
                f"({cpu['ours'][-1]:6.1f} per CPU s), vanilla {wall['vanilla'][-1]:6.1f} "
                f"({cpu['vanilla'][-1]:6.1f})",
                flush=True,
            )
        summary: dict[str, Any] = {"wall_tok_s": wall, "cpu_tok_s": cpu}
        for kind, data in (("wall", wall), ("cpu", cpu)):
            paired = [o / v for o, v in zip(data["ours"], data["vanilla"], strict=True)]
            summary[f"{kind}_ratio_of_medians"] = statistics.median(
                data["ours"]
            ) / statistics.median(data["vanilla"])
            summary[f"{kind}_median_paired_ratio"] = statistics.median(paired)
        results[workload] = summary
        print(
            f"{workload}: ours/vanilla wall {summary['wall_ratio_of_medians']:.3f} "
            f"(median paired {summary['wall_median_paired_ratio']:.3f}), engine CPU "
            f"{summary['cpu_ratio_of_medians']:.3f} "
            f"(median paired {summary['cpu_median_paired_ratio']:.3f})",
            flush=True,
        )

    plain_wall = statistics.median(results["sampled"]["wall_tok_s"]["ours"])
    plain_cpu = statistics.median(results["sampled"]["cpu_tok_s"]["ours"])
    w, c = engines["ours"].timed_pass(prompts, params["rules"])
    results["rules_used"] = {
        "wall_tok_s": w,
        "cpu_tok_s": c,
        "wall_vs_plain_sampled": w / plain_wall,
        "cpu_vs_plain_sampled": c / plain_cpu,
    }
    print(
        f"every request using rules (n-gram 3, bad words, penalty): {w:.1f} tok/s, "
        f"{w / plain_wall:.3f} x plain sampling (engine CPU: {c / plain_cpu:.3f} x)",
        flush=True,
    )


# --- 2. the sampler step ------------------------------------------------------------------


# The sampler configurations the step benchmark alternates: vLLM's built-ins with raw
# log-probs (vLLM's own server), the server's default (our processor, raw log-probs) and
# the server with KAITO_OUTPUT_SCORES=true (our processor, processed log-probs).
STEP_CONFIGS = {
    "vanilla": (False, False),
    "ours": (True, False),
    "ours_scores": (True, True),
}


def sampler_step_cost(
    batch: int, vocab: int, iterations: int, device_name: str = "cpu"
) -> dict[str, Any]:
    """Microseconds per vLLM Sampler step over plain requests (none asks for log-probs),
    for each of STEP_CONFIGS, in rotating order. On "cuda" vLLM picks its CUDA sampler,
    FlashInfer's where the mode and the environment allow (VLLM_USE_FLASHINFER_SAMPLER)."""
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import (
        BatchUpdateBuilder,
        LogitBiasLogitsProcessor,
        LogitsProcessors,
        MinPLogitsProcessor,
        MinTokensLogitsProcessor,
    )
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    from app.engines.processors.vllm_processor import TransformersRulesProcessor
    from app.engines.vllm_engine import logprobs_mode
    from app.settings import Settings

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=batch))
    outputs: list[list[int]] = [[] for _ in range(batch)]

    def setup(ours: bool, scores: bool, sampled: bool) -> tuple[Any, Any]:
        classes: list[Any] = [
            MinTokensLogitsProcessor,
            LogitBiasLogitsProcessor,
            MinPLogitsProcessor,
        ]
        if ours:
            classes.append(TransformersRulesProcessor)
        processors = LogitsProcessors(cls(config, device, False) for cls in classes)
        builder = BatchUpdateBuilder()
        params = SamplingParams(temperature=1.0 if sampled else 0.0, top_k=10 if sampled else 0)
        for i in range(batch):
            builder.added.append((i, params, [1, 2, 3], outputs[i]))
        update = builder.get_and_reset(batch)
        for p in processors.all:
            p.update_state(update)
        metadata = SamplingMetadata(
            temperature=torch.ones(batch, device=device) if sampled else None,
            all_greedy=not sampled,
            all_random=sampled,
            top_p=None,
            # int32, as vLLM's input batch holds it (FlashInfer's kernel takes that).
            top_k=torch.full((batch,), 10, dtype=torch.int32, device=device) if sampled else None,
            generators={},
            max_num_logprobs=None,
            no_penalties=True,
            prompt_token_ids=None,
            frequency_penalties=torch.zeros(batch, device=device),
            presence_penalties=torch.zeros(batch, device=device),
            repetition_penalties=torch.ones(batch, device=device),
            # vLLM passes the output lists whenever custom processors are registered.
            output_token_ids=outputs if ours else [],
            allowed_token_ids_mask=None,
            bad_words_token_ids={},
            logitsprocs=processors,
        )
        # The mode the server would give the engine (vanilla: vLLM's default).
        mode = logprobs_mode(Settings(output_scores=scores)) if ours else "raw_logprobs"
        return Sampler(logprobs_mode=mode), metadata  # type: ignore[arg-type]

    names = list(STEP_CONFIGS)
    results: dict[str, Any] = {}
    logits = torch.randn(batch, vocab, device=device)
    for workload in ("greedy", "sampled"):
        runs = {name: setup(*STEP_CONFIGS[name], sampled=workload == "sampled") for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(iterations):
            # Rotate the order so each configuration runs first, second and third alike.
            for name in names[i % 3 :] + names[: i % 3]:
                sampler, metadata = runs[name]
                sync()
                start = time.perf_counter()
                for p in metadata.logitsprocs.all:  # the per-step update vLLM makes
                    p.update_state(None)
                sampler(logits.clone(), metadata)
                sync()
                times[name].append(time.perf_counter() - start)
        # The minimum estimates the intrinsic cost when other processes share the cores;
        # the median shows what contention did to it.
        for stat, agg in (("min", min), ("median", statistics.median)):
            us = {name: agg(times[name]) * 1e6 for name in names}
            results.setdefault(workload, {})[stat] = {
                **{f"{name}_us": value for name, value in us.items()},
                "extra_us": us["ours"] - us["vanilla"],
                "scores_extra_us": us["ours_scores"] - us["vanilla"],
            }
            print(
                f"sampler step, {batch} plain {workload} rows ({stat}): vanilla "
                f"{us['vanilla']:.0f} us, ours {us['ours']:.0f} us "
                f"({us['ours'] - us['vanilla']:+.0f}), ours with KAITO_OUTPUT_SCORES "
                f"{us['ours_scores']:.0f} us ({us['ours_scores'] - us['vanilla']:+.0f})",
                flush=True,
            )
    return results


def main() -> None:
    from app.settings import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8, help="engine max_num_seqs")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of one pass per engine")
    parser.add_argument("--compiled", action="store_true", help="torch.compile (slow start)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--vanilla-first", action="store_true", help="build vanilla first")
    parser.add_argument(
        "--output-scores",
        action="store_true",
        help="end to end: ours as with KAITO_OUTPUT_SCORES=true (processed log-probs)",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--step-iterations", type=int, default=300)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if on_gpu() else "cpu",
        help="where the sampler step runs (default: cuda when a GPU is visible)",
    )
    args = parser.parse_args()
    configure_environment()

    def on_sigterm(*_: Any) -> None:
        raise SystemExit(143)  # unwinds through the finally below: no orphaned engines

    signal.signal(signal.SIGTERM, on_sigterm)
    results: dict[str, Any] = {
        "setup": {
            "requests": args.requests,
            "tokens": args.tokens,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "eager": not args.compiled,
            "cpus": os.cpu_count(),
            "output_scores": args.output_scores,
            "device": args.device,
            "load_average_at_start": os.getloadavg(),
        },
        "sampler_step": sampler_step_cost(
            args.concurrency, 49152, args.step_iterations, args.device
        ),
    }
    if not args.skip_end_to_end:
        engines: dict[str, Engine] = {}
        try:
            # Creation order is a variable of its own on a shared machine (which engine's
            # threads start first): --vanilla-first swaps it to check a ratio against it.
            order = ("vanilla", "ours") if args.vanilla_first else ("ours", "vanilla")
            results["setup"]["created_first"] = order[0]
            for name in order:
                engines[name] = Engine(
                    args.model,
                    name == "ours",
                    args.concurrency,
                    not args.compiled,
                    args.output_scores,
                )
            end_to_end(args, engines, results)
        finally:
            for engine in engines.values():
                engine.llm.llm_engine.engine_core.shutdown()
    results["setup"]["load_average_at_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
