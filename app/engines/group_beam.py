"""Diverse (group) beam search with transformers 4.x semantics, on a transformers model.

transformers 5 moved group beam search out of core (``num_beam_groups > 1`` now needs
the hub repository transformers-community/group-beam-search, which this server cannot
reach), so this reproduces ``GenerationMixin._group_beam_search`` of transformers 4.55
with its ``BeamSearchScorer`` / ``BeamHypotheses``:

- ``num_beams`` beams split into ``num_beam_groups`` groups of ``group_size``; the first
  beam of each group starts at score 0, the others at -1e9;
- at each step the groups run in turn: log_softmax, then the Hamming diversity penalty
  (``diversity_penalty`` times how often earlier groups chose each token at this step),
  then the other logits processors, plus the beam scores; the group keeps its top
  ``max(2, 1 + n_eos) * group_size`` candidates;
- an eos candidate among the group's first ``group_size`` becomes a hypothesis scored
  ``sum_logprobs / generated_len ** length_penalty`` (each group keeps ``group_size``);
  the best ``group_size`` other candidates continue;
- a group is done once it holds ``group_size`` hypotheses and ``early_stopping`` says so
  (True: at once; False: the best candidate cannot beat the worst hypothesis at the
  current length; "never": nor at ``max_length`` when ``length_penalty > 0``); a done
  group feeds pad tokens, which still count for the diversity penalty;
- at the end, undone groups' running beams become hypotheses; the best
  ``num_return_sequences`` of all groups are returned, an eos-finished one followed by
  the first eos id, as 4.x ``finalize`` writes it.

Several prompts with the same settings run as one left-padded batch (positions from the
attention mask, as ``generate`` derives them); every prompt keeps its own groups,
hypotheses and stopping, as 4.x's batched scorer does. Each sequence carries its
hypothesis score (4.x ``sequences_scores``) and the processed log-probability of each
token on the beam that chose it (what ``compute_transition_scores`` reads from 4.x's
``scores`` and ``beam_indices``: after the diversity penalty and the processors).

Only imported by the transformers backend, which has torch loaded already.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from app.engines.base import GeneratedSequence


class _Hypotheses:
    """transformers 4.x ``BeamHypotheses`` for one group."""

    def __init__(
        self, size: int, length_penalty: float, early_stopping: bool | str, max_length: int
    ) -> None:
        self.size = size
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length
        # (score, tokens, ended by eos, each token's log-probability)
        self.beams: list[tuple[float, list[int], bool, list[float]]] = []
        self.worst_score = 1e9

    def add(
        self,
        tokens: list[int],
        sum_logprobs: float,
        generated_len: int,
        eos: bool,
        logprobs: list[float],
    ) -> None:
        score = sum_logprobs / (generated_len**self.length_penalty)
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append((score, tokens, eos, logprobs))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _, _, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int, prompt_len: int) -> bool:
        if len(self.beams) < self.size:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best = best_sum_logprobs / (self.max_length - prompt_len) ** self.length_penalty
        else:
            best = best_sum_logprobs / (cur_len - prompt_len) ** self.length_penalty
        return self.worst_score >= best


def logits_processors(model: Any, kwargs: Mapping[str, Any], prompt: torch.Tensor) -> Any:
    """The non-diversity processors transformers 4.x builds for group beam search, in its
    order (repetition, n-gram bans, bad words, min length, forced bos/eos, inf/nan)."""
    from transformers.generation.logits_process import (
        EncoderNoRepeatNGramLogitsProcessor,
        ForcedBOSTokenLogitsProcessor,
        ForcedEOSTokenLogitsProcessor,
        InfNanRemoveLogitsProcessor,
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoBadWordsLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    eos = list(kwargs.get("eos_token_id") or [])
    prompt_len = prompt.shape[-1]
    max_length = prompt_len + int(kwargs["max_new_tokens"])
    out = LogitsProcessorList()
    if kwargs.get("repetition_penalty", 1.0) != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(penalty=float(kwargs["repetition_penalty"])))
    if kwargs.get("no_repeat_ngram_size", 0) > 0:
        out.append(NoRepeatNGramLogitsProcessor(int(kwargs["no_repeat_ngram_size"])))
    if kwargs.get("encoder_no_repeat_ngram_size", 0) > 0:
        out.append(
            EncoderNoRepeatNGramLogitsProcessor(
                int(kwargs["encoder_no_repeat_ngram_size"]),
                prompt,  # type: ignore[arg-type]  # a LongTensor at runtime
            )
        )
    if kwargs.get("bad_words_ids"):
        out.append(NoBadWordsLogitsProcessor(kwargs["bad_words_ids"], eos or None))
    if kwargs.get("min_new_tokens", 0) > 0 and eos:
        out.append(
            MinNewTokensLengthLogitsProcessor(prompt_len, int(kwargs["min_new_tokens"]), eos)
        )
    if kwargs.get("forced_bos_token_id") is not None:
        out.append(ForcedBOSTokenLogitsProcessor(int(kwargs["forced_bos_token_id"])))
    if kwargs.get("forced_eos_token_id") is not None:
        out.append(ForcedEOSTokenLogitsProcessor(max_length, int(kwargs["forced_eos_token_id"])))
    if kwargs.get("remove_invalid_values") is True:
        out.append(InfNanRemoveLogitsProcessor())
    return out


@torch.inference_mode()
def group_beam_search(
    model: Any,
    prompt_ids: list[int],
    kwargs: Mapping[str, Any],
    should_stop: Callable[[], bool] = lambda: False,
) -> list[GeneratedSequence]:
    """Runs group beam search for one prompt; ``kwargs`` are transformers generate kwargs."""
    return group_beam_search_batch(model, [prompt_ids], kwargs, should_stop)[0]


@torch.inference_mode()
def group_beam_search_batch(
    model: Any,
    prompts: list[list[int]],
    kwargs: Mapping[str, Any],
    should_stop: Callable[[], bool] = lambda: False,
) -> list[list[GeneratedSequence]]:
    """Runs group beam search for several prompts with the same ``kwargs`` (transformers
    generate kwargs) as one batch; one list of sequences per prompt.

    ``should_stop`` is polled once per step (a cancelled batch stops early and its
    results are thrown away: every prompt then gets no sequences).
    """
    from transformers import DynamicCache

    num_beams = int(kwargs["num_beams"])
    num_groups = int(kwargs["num_beam_groups"])
    group_size = num_beams // num_groups
    diversity_penalty = float(kwargs.get("diversity_penalty", 0.0))
    length_penalty = float(kwargs.get("length_penalty", 1.0))
    early_stopping = kwargs.get("early_stopping", False)
    n_return = int(kwargs.get("num_return_sequences", 1))
    eos_ids = list(kwargs.get("eos_token_id") or [])
    eos = frozenset(eos_ids)
    pad = kwargs.get("pad_token_id")
    pad_id = int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0)
    device = next(model.parameters()).device
    batch = len(prompts)

    # Left-padded prompts; all-ones mask without padding (a lone prompt is unchanged).
    prompt_len = max(len(p) for p in prompts)
    prompt = torch.tensor(
        [[pad_id] * (prompt_len - len(p)) + list(p) for p in prompts],
        dtype=torch.long,
        device=device,
    )
    prompt_mask = torch.tensor(
        [[0] * (prompt_len - len(p)) + [1] * len(p) for p in prompts],
        dtype=torch.long,
        device=device,
    )
    max_length = prompt_len + int(kwargs["max_new_tokens"])
    processors = logits_processors(model, kwargs, prompt)

    # Rows are prompt-major: prompt b's beams are rows b * num_beams ... + num_beams.
    hyps = [
        [
            _Hypotheses(group_size, length_penalty, early_stopping, max_length)
            for _ in range(num_groups)
        ]
        for _ in range(batch)
    ]
    done = [[False] * num_groups for _ in range(batch)]
    input_ids = prompt.repeat_interleave(num_beams, dim=0)
    attention_mask = prompt_mask.repeat_interleave(num_beams, dim=0)
    padded = bool((prompt_mask == 0).any())
    beam_scores = torch.full((batch, num_beams), -1e9, dtype=torch.float, device=device)
    beam_scores[:, ::group_size] = 0
    beam_scores = beam_scores.view(-1)
    token_logprobs: list[list[float]] = [[] for _ in range(batch * num_beams)]
    n_keep = max(2, 1 + len(eos)) * group_size
    arange_beams = torch.arange(num_beams, device=device)

    cache = DynamicCache()
    step_input = input_ids
    cur_len = prompt_len
    while True:
        if should_stop():
            return [[] for _ in prompts]
        model_kwargs: dict[str, Any] = {}
        if padded:
            # generate's rule: positions count the row's real tokens only.
            positions = attention_mask.cumsum(-1) - 1
            positions = positions.masked_fill(attention_mask == 0, 1)
            model_kwargs["position_ids"] = positions[:, -step_input.shape[1] :]
        outputs = model(
            input_ids=step_input,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
            **model_kwargs,
        )
        cache = outputs.past_key_values
        logits = outputs.logits[:, -1, :]
        current_tokens = torch.zeros(batch * num_beams, dtype=input_ids.dtype, device=device)
        reordering = torch.zeros(batch * num_beams, dtype=torch.long, device=device)
        next_logprobs: list[list[float]] = [[] for _ in range(batch * num_beams)]
        for g in range(num_groups):
            start, end = g * group_size, (g + 1) * group_size
            # This group's rows of every prompt, prompt-major.
            rows = (
                (torch.arange(batch, device=device) * num_beams).unsqueeze(-1)
                + arange_beams[start:end]
            ).view(-1)
            group_ids = input_ids[rows]
            scores = nn.functional.log_softmax(logits[rows].to(torch.float32), dim=-1)
            vocab_size = scores.shape[-1]
            if diversity_penalty > 0.0 and start > 0:
                # HammingDiversityLogitsProcessor: this prompt's earlier groups' tokens at
                # this step.
                earlier = current_tokens.view(batch, num_beams)[:, :start]
                frequency = torch.zeros(batch, vocab_size, dtype=scores.dtype, device=device)
                frequency.scatter_add_(
                    1, earlier, torch.ones(earlier.shape, dtype=scores.dtype, device=device)
                )
                scores = scores - diversity_penalty * frequency.repeat_interleave(group_size, dim=0)
            scores = processors(group_ids, scores)
            next_scores = (scores + beam_scores[rows].unsqueeze(-1)).view(
                batch, group_size * vocab_size
            )
            next_scores, next_tokens = torch.topk(
                next_scores, n_keep, dim=1, largest=True, sorted=True
            )
            next_indices = torch.div(next_tokens, vocab_size, rounding_mode="floor")
            next_tokens = next_tokens % vocab_size

            for b in range(batch):
                base = b * num_beams + start
                if done[b][g]:
                    # 4.x: a done group continues with pad tokens, score 0, from its beam 0.
                    beam_scores[base : base + group_size] = 0
                    current_tokens[base : base + group_size] = pad_id
                    reordering[base : base + group_size] = base
                    for i in range(group_size):
                        next_logprobs[base + i] = token_logprobs[base]
                    continue
                # BeamSearchScorer.process for this prompt's group.
                kept = 0
                new_indices = [0] * group_size
                for rank in range(n_keep):
                    token = int(next_tokens[b, rank])
                    index = int(next_indices[b, rank])
                    # The token's processed log-probability on the beam that chose it.
                    logprob = float(scores[b * group_size + index, token].item())
                    history = token_logprobs[base + index]
                    if token in eos:
                        if rank >= group_size:
                            continue
                        hyps[b][g].add(
                            input_ids[base + index].tolist()[prompt_len:],
                            float(next_scores[b, rank].item()),
                            generated_len=cur_len + 1 - prompt_len,
                            eos=True,
                            logprobs=history + [logprob],
                        )
                    else:
                        beam_scores[base + kept] = next_scores[b, rank]
                        current_tokens[base + kept] = token
                        new_indices[kept] = index
                        next_logprobs[base + kept] = history + [logprob]
                        kept += 1
                    if kept == group_size:
                        break
                done[b][g] = done[b][g] or hyps[b][g].is_done(
                    float(next_scores[b].max().item()), cur_len + 1, prompt_len
                )
                reordering[base : base + group_size] = base + torch.tensor(
                    new_indices, dtype=torch.long, device=device
                )
            # Later groups see this group's chosen beams (4.x updates input_ids in place).
            input_ids[rows] = input_ids[reordering[rows]]

        token_logprobs = next_logprobs
        input_ids = torch.cat([input_ids, current_tokens.unsqueeze(-1)], dim=-1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
        cache.reorder_cache(reordering)
        step_input = current_tokens.unsqueeze(-1)
        cur_len += 1
        # The loop's stopping criteria: max_length, or every group of every prompt done
        # (a row ending in eos is a done group's pad when pad is eos).
        if all(all(d) for d in done) or cur_len >= max_length:
            break

    results = []
    for b in range(batch):
        # BeamSearchScorer.finalize.
        for g in range(num_groups):
            if done[b][g]:
                continue
            for i in range(b * num_beams + g * group_size, b * num_beams + (g + 1) * group_size):
                tokens = input_ids[i].tolist()[prompt_len:]
                hyps[b][g].add(
                    tokens,
                    float(beam_scores[i].item()),
                    generated_len=len(tokens),
                    eos=False,
                    logprobs=token_logprobs[i],
                )
        candidates = [beam for h in hyps[b] for beam in h.beams]
        ranked = sorted(candidates, key=lambda x: x[0])
        sequences = []
        for _ in range(n_return):
            score, tokens, ended_by_eos, logprobs = ranked.pop()
            if ended_by_eos:
                # 4.x writes eos_token_id[0] after a finished hypothesis, whichever eos
                # ended it (the log-probability is the one of the eos that did).
                sequences.append(
                    GeneratedSequence(
                        token_ids=tokens + [eos_ids[0]],
                        finish_reason="stop",
                        logprobs=logprobs,
                        sequence_score=score,
                    )
                )
            else:
                sequences.append(
                    GeneratedSequence(
                        token_ids=tokens,
                        finish_reason="length",
                        logprobs=logprobs,
                        sequence_score=score,
                    )
                )
        results.append(sequences)
    return results
