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

``run_on_vllm`` drives it with vLLM's AsyncLLM, batched with every other request in the
engine: each running beam is a long-lived greedy request streaming its top-k log-probs
per position; a child that continues with its parent's own next token takes the parent's
request over, any other child forks a new request whose prefix comes from the prefix
cache. (Sending every beam as a new one-token request each step, as vLLM's own
``beam_search`` does, recomputes each beam's tail every step: bench/NOTES_beam.md.)
"""

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.engines.base import EngineDeadError, GeneratedSequence
from param_mapping import BeamSpec

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

_F32 = np.float32
# transformers marks impossible candidates by adding -1e9 to a float32 score.
_NEG = _F32(-1.0e9)


@dataclass
class _Beam:
    tokens: list[int]
    score: np.float32
    # Each token's log-prob where it was chosen: transformers' transition scores
    # (compute_transition_scores with beam_indices; its beam search stores the
    # processed log-probs, log_softmax first).
    logprobs: list[float]


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
        self.running: list[_Beam] = [_Beam([], _F32(0.0), [])]
        # Finished hypotheses, best first, at most num_beams (transformers' "slots").
        self.finished: list[_Beam] = []
        self._heuristic_unsatisfied = True
        self.done = False
        # After each step: the index (in the previous beams()) each running beam grew from.
        self.parents: list[int] = [0]

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
        candidates: list[tuple[np.float32, int, int, float]] = []
        for b, (beam, pairs) in enumerate(zip(self.running, top_logprobs, strict=True)):
            for token, logprob in pairs:
                if ban_eos and token in self.eos:
                    continue
                candidates.append((_F32(beam.score + _F32(logprob)), b, int(token), float(logprob)))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        topk = candidates[: self.beams_to_keep]

        # d. Which candidates hit a stopping criterion (eos, or max_length reached).
        reaches_max = self.cur_len + 1 >= self.max_length
        hits = [reaches_max or tok in self.eos for _, _, tok, _ in topk]

        # e. The best num_beams unfinished candidates continue (finished ones sink by -1e9).
        order = sorted(
            range(len(topk)),
            key=lambda i: (-(topk[i][0] + _NEG) if hits[i] else -topk[i][0], i),
        )
        next_running = [
            _Beam(
                self.running[topk[i][1]].tokens + [topk[i][2]],
                _F32(topk[i][0] + _NEG) if hits[i] else topk[i][0],
                self.running[topk[i][1]].logprobs + [topk[i][3]],
            )
            for i in order[: self.num_beams]
        ]
        parents = [topk[i][1] for i in order[: self.num_beams]]

        # f. Only the top num_beams candidates may become finished hypotheses.
        all_full = len(self.finished) == self.num_beams
        if not (all_full and self.spec.early_stopping is True) and self._heuristic_unsatisfied:
            denominator = self._denominator(self.cur_len + 1 - self.prompt_len)
            merged = list(self.finished)
            for i in range(min(self.num_beams, len(topk))):
                if hits[i]:
                    score, b, tok, logprob = topk[i]
                    parent = self.running[b]
                    merged.append(
                        _Beam(
                            parent.tokens + [tok],
                            _F32(score / denominator),
                            parent.logprobs + [logprob],
                        )
                    )
            # A stable sort keeps older hypotheses first on ties, as topk over
            # cat(old, new) tends to.
            merged.sort(key=lambda h: -h.score)
            self.finished = merged[: self.num_beams]

        # g. Stopping: the early-stop heuristic, early_stopping=True, or no continuation.
        self.cur_len += 1
        self.running = next_running
        self.parents = parents
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
            out.append(
                GeneratedSequence(
                    token_ids=list(hyp.tokens),
                    finish_reason=reason,
                    logprobs=list(hyp.logprobs),
                    # transformers' sequences_scores: sum of log-probs / length ** penalty.
                    sequence_score=float(hyp.score),
                )
            )
        return out


class _BeamRequest:
    """One engine request that decodes a beam greedily and reports, position by position,
    the token it chose and the top log-probs it chose from.

    The request is submitted when its first position is awaited (AsyncLLM.generate starts
    on first iteration). Deltas that arrive while the search is busy elsewhere are merged
    by vLLM's output collector; they are split back into positions here.
    """

    def __init__(
        self,
        llm: "AsyncLLM",
        prompt: list[int],
        params: Any,
        request_id: str,
        lora_request: Any = None,
    ) -> None:
        from vllm.inputs import TokensPrompt

        self.request_id = request_id
        self._stream = llm.generate(
            TokensPrompt(prompt_token_ids=prompt), params, request_id, lora_request=lora_request
        )
        self._positions: deque[tuple[int, list[tuple[int, float]]]] = deque()
        self.finished = False

    async def next_position(self) -> tuple[int, list[tuple[int, float]]]:
        while not self._positions:
            if self.finished:
                raise RuntimeError(f"beam request {self.request_id} ended early")
            output = await self._stream.__anext__()
            completion = output.outputs[0]
            if completion.finish_reason == "abort":
                raise RuntimeError(f"beam request {self.request_id} was aborted")
            logprobs = completion.logprobs or []
            for i, token in enumerate(completion.token_ids):
                top = [(int(t), float(lp.logprob)) for t, lp in logprobs[i].items()]
                self._positions.append((int(token), top))
            self.finished = output.finished
        return self._positions.popleft()

    async def close(self) -> None:
        """Ends the request: closing vLLM's stream aborts it (AsyncLLM.generate aborts on
        GeneratorExit), which frees its batch slot and KV blocks at once."""
        with contextlib.suppress(Exception):
            await self._stream.aclose()


async def run_on_vllm(
    llm: "AsyncLLM",
    request_id: str,
    prompt_token_ids: list[int],
    search: BeamSearch,
    lora_request: Any = None,
) -> list[GeneratedSequence]:
    """Runs ``search`` to the end on a running AsyncLLM (every beam with the request's LoRA
    adapter, if any); cancelling aborts every request.

    Each running beam is one long-lived engine request that keeps decoding greedily
    (temperature 0: its own next token is the argmax) and streams its top log-probs per
    position. After a step, a kept child whose token is the one its parent's request
    already produced takes that request over (inherit); any other child starts a new
    request on its tokens (fork), whose prefix the prefix cache supplies. A request whose
    beam has no child left is aborted at once, and all are aborted when the search ends,
    fails or is cancelled (client gone, timeout).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

    counter = itertools.count()

    def start(tokens: list[int]) -> _BeamRequest:
        params = SamplingParams(
            # Up to the search's length limit: the request need not stop before the beam.
            max_tokens=search.max_length - search.prompt_len - len(tokens),
            temperature=0.0,
            logprobs=search.logprobs_needed,
            # eos and the min-length rule are the search's to apply, not the engine's.
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        return _BeamRequest(
            llm, prompt_token_ids + tokens, params, f"{request_id}-b{next(counter)}", lora_request
        )

    requests = [start(tokens) for tokens in search.beams()]
    forks = kept = 0
    try:
        while not search.done:
            try:
                positions = await asyncio.gather(*(r.next_position() for r in requests))
            except VLLMEngineDead as exc:
                raise EngineDeadError("the vLLM engine died") from exc
            search.step([top for _, top in positions])
            if search.done:
                break
            inherited: set[int] = set()
            following = []
            for parent, tokens in zip(search.parents, search.beams(), strict=True):
                if parent not in inherited and positions[parent][0] == tokens[-1]:
                    inherited.add(parent)
                    following.append(requests[parent])
                else:
                    following.append(start(tokens))
            forked = len(following) - len(inherited)
            forks += forked
            kept += len(following)
            log.debug(
                "beam search %s step %d: %d of %d beams forked",
                request_id,
                search.cur_len - search.prompt_len,
                forked,
                len(following),
            )
            for i, request in enumerate(requests):
                if i not in inherited:
                    await request.close()
            requests = following
    finally:
        for request in requests:
            await request.close()
    log.debug(
        "beam search %s done: %d forks of %d beams continued (%.2f)",
        request_id,
        forks,
        kept,
        forks / kept if kept else 0.0,
    )
    return search.results()
