"""Plain beam search with transformers 5 semantics, driven by per-beam top-k log-probs.

``BeamSearch`` is a pure state machine: it says which beams to expand, takes each beam's
most likely next tokens with their log-probabilities, and applies the rules of
transformers' ``GenerationMixin._beam_search`` (5.x, greedy, one sequence):

- K = max(2, 1 + number of eos ids) * num_beams candidates are kept per step, from the
  running scores plus the new log-probs (float32 sums, as transformers keeps them);
- a candidate that ends in an eos id or reaches ``max_length`` is finished; only the
  first ``num_beams`` candidates may enter the finished list, scored by
  ``sum_logprobs / generated_len ** length_penalty``;
- the best ``num_beams`` unfinished candidates continue;
- the search stops when every candidate is finished, when ``early_stopping=True`` and
  ``num_beams`` sequences are finished, or when the running beams cannot beat the worst
  finished one (the heuristic differs for ``False`` and ``"never"``).

Since transformers applies its logits processors to log-probabilities (``log_softmax``
first), the min-length rule (eos is -inf until ``min_new_tokens``) only removes
candidates, which top-k log-probs can reproduce: ask for ``logprobs_needed`` per beam.

``run_on_vllm`` drives it with vLLM's AsyncLLM: each step sends every running beam as a
one-token request asking for its top-k log-probs, so beam requests batch with every other
request in the engine, and prefix caching reuses the shared prefixes' KV cache (as vLLM's
own ``beam_search`` does).
"""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.engines.base import EngineDeadError, GeneratedSequence
from param_mapping import BeamSpec

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

_F32 = np.float32
# transformers marks impossible candidates by adding -1e9 to a float32 score.
_NEG = _F32(-1.0e9)


@dataclass
class _Beam:
    tokens: list[int]
    score: np.float32


class BeamSearch:
    def __init__(
        self,
        spec: BeamSpec,
        *,
        prompt_len: int,
        max_new_tokens: int,
        min_new_tokens: int,
        eos_token_ids: Sequence[int],
    ) -> None:
        if spec.num_beam_groups != 1 or spec.do_sample:
            raise ValueError("BeamSearch implements plain (greedy, one group) beam search")
        self.spec = spec
        self.num_beams = spec.num_beams
        self.eos = frozenset(eos_token_ids)
        self.beams_to_keep = max(2, 1 + len(self.eos)) * spec.num_beams
        self.prompt_len = prompt_len
        self.max_length = prompt_len + max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.cur_len = prompt_len
        # transformers starts with num_beams copies of the prompt, all but the first at
        # -1e9, so the first step only expands one of them.
        self.running: list[_Beam] = [_Beam([], _F32(0.0))]
        # Finished hypotheses, best first, at most num_beams (transformers' "slots").
        self.finished: list[_Beam] = []
        self._heuristic_unsatisfied = True
        self.done = False

    @property
    def logprobs_needed(self) -> int:
        """Top log-probs to ask per beam: K, plus the eos ids the min-length rule bans."""
        return self.beams_to_keep + (len(self.eos) if self.min_new_tokens > 0 else 0)

    def beams(self) -> list[list[int]]:
        """The generated tokens of each beam to expand this step, in order."""
        return [b.tokens for b in self.running]

    def _denominator(self, length: int) -> np.float32:
        return _F32(length**self.spec.length_penalty)

    def step(self, top_logprobs: Sequence[Sequence[tuple[int, float]]]) -> None:
        """One step: ``top_logprobs[i]`` holds (token id, log-prob) pairs for ``beams()[i]``.

        Each beam must come with at least ``logprobs_needed`` pairs (more is fine).
        """
        if self.done:
            raise RuntimeError("beam search already finished")
        if len(top_logprobs) != len(self.running):
            raise ValueError("one list of log-probs per running beam is needed")
        generated = self.cur_len - self.prompt_len
        ban_eos = generated < self.min_new_tokens  # MinNewTokensLengthLogitsProcessor

        # a-c. Accumulated scores, best K over all beams (ties: lower beam, lower token,
        # the order of torch.topk over the flattened beam x vocab scores).
        candidates: list[tuple[np.float32, int, int]] = []
        for b, (beam, pairs) in enumerate(zip(self.running, top_logprobs, strict=True)):
            for token, logprob in pairs:
                if ban_eos and token in self.eos:
                    continue
                candidates.append((_F32(beam.score + _F32(logprob)), b, int(token)))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        topk = candidates[: self.beams_to_keep]

        # d. Which candidates hit a stopping criterion (eos, or max_length reached).
        reaches_max = self.cur_len + 1 >= self.max_length
        hits = [reaches_max or tok in self.eos for _, _, tok in topk]

        # e. The best num_beams unfinished candidates continue (finished ones sink by -1e9).
        order = sorted(
            range(len(topk)),
            key=lambda i: (-(topk[i][0] + _NEG) if hits[i] else -topk[i][0], i),
        )
        next_running = [
            _Beam(
                self.running[topk[i][1]].tokens + [topk[i][2]],
                _F32(topk[i][0] + _NEG) if hits[i] else topk[i][0],
            )
            for i in order[: self.num_beams]
        ]

        # f. Only the top num_beams candidates may become finished hypotheses.
        all_full = len(self.finished) == self.num_beams
        if not (all_full and self.spec.early_stopping is True) and self._heuristic_unsatisfied:
            denominator = self._denominator(self.cur_len + 1 - self.prompt_len)
            merged = list(self.finished)
            for i in range(min(self.num_beams, len(topk))):
                if hits[i]:
                    score, b, tok = topk[i]
                    merged.append(_Beam(self.running[b].tokens + [tok], _F32(score / denominator)))
            # A stable sort keeps older hypotheses first on ties, as topk over
            # cat(old, new) tends to.
            merged.sort(key=lambda h: -h.score)
            self.finished = merged[: self.num_beams]

        # g. Stopping: the early-stop heuristic, early_stopping=True, or no continuation.
        self.cur_len += 1
        self.running = next_running
        if len(self.finished) == self.num_beams and self._heuristic_unsatisfied:
            if self.spec.early_stopping == "never" and self.spec.length_penalty > 0.0:
                best_len = self.max_length - self.prompt_len
            else:
                best_len = self.cur_len - self.prompt_len
            best_running = _F32(self.running[0].score / self._denominator(best_len))
            worst_finished = min(h.score for h in self.finished)
            self._heuristic_unsatisfied = bool(best_running > worst_finished)
        full_and_early = len(self.finished) == self.num_beams and self.spec.early_stopping is True
        self.done = not self._heuristic_unsatisfied or full_and_early or all(hits)

    def results(self) -> list[GeneratedSequence]:
        """The best ``num_return_sequences`` finished sequences, best first."""
        if not self.done:
            raise RuntimeError("beam search not finished")
        out = []
        for hyp in self.finished[: self.spec.num_return_sequences]:
            reason = "stop" if hyp.tokens and hyp.tokens[-1] in self.eos else "length"
            out.append(GeneratedSequence(token_ids=list(hyp.tokens), finish_reason=reason))
        return out


async def _one_step(
    llm: "AsyncLLM", prompt: list[int], params: Any, request_id: str, lora_request: Any = None
) -> Any:
    from vllm.inputs import TokensPrompt

    final = None
    async for output in llm.generate(
        TokensPrompt(prompt_token_ids=prompt), params, request_id, lora_request=lora_request
    ):
        final = output
    return final


async def run_on_vllm(
    llm: "AsyncLLM",
    request_id: str,
    prompt_token_ids: list[int],
    search: BeamSearch,
    lora_request: Any = None,
) -> list[GeneratedSequence]:
    """Runs ``search`` to the end on a running AsyncLLM (with the request's LoRA adapter,
    if any); cancelling aborts every step."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprobs=search.logprobs_needed,
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

    step = 0
    while not search.done:
        try:
            outputs = await asyncio.gather(
                *(
                    _one_step(
                        llm,
                        prompt_token_ids + tokens,
                        params,
                        f"{request_id}-s{step}-b{i}",
                        lora_request,
                    )
                    for i, tokens in enumerate(search.beams())
                )
            )
        except VLLMEngineDead as exc:
            raise EngineDeadError("the vLLM engine died") from exc
        top = []
        for output in outputs:
            completion = output.outputs[0]
            if completion.finish_reason == "abort" or not completion.logprobs:
                raise RuntimeError(
                    f"beam step of {request_id} ended with {completion.finish_reason}"
                )
            top.append([(tok, lp.logprob) for tok, lp in completion.logprobs[0].items()])
        search.step(top)
        step += 1
    return search.results()
