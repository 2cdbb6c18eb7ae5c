"""The vLLM V1 logits processor that runs ``rules`` for the requests that ask for them.

Registered once per engine (``AsyncEngineArgs.logits_processors=[PROCESSOR_FQCN]``); the
engine core builds one instance per persistent batch. State lives in a dict keyed by
batch row, maintained with vLLM's own ``process_dict_updates`` (added, removed, moved
and swapped rows), as vLLM's built-in sparse processors do. A request that does not
carry our extra_args key never gets an entry, and with no entries ``apply`` returns the
logits untouched.

Nothing a client sends may raise in here: an exception inside the engine core kills
the engine for every user. Values are validated twice before they arrive (the mapping,
then ``validate_params`` in the front-end process), and ``apply`` still contains any
failure to the one row, logging it.
"""

import logging
from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from app.engines.processors import EXTRA_ARGS_KEY
from app.engines.processors.rules import RowState, RuleArgs

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger(__name__)


def _rules_of(params: SamplingParams) -> RuleArgs | None:
    raw = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    return None if raw is None else RuleArgs.parse(raw)


class TransformersRulesProcessor(LogitsProcessor):
    """transformers' typical_p, n-gram bans, multi-token bad words, forced BOS/EOS,
    inf/nan removal, min length and repetition penalty, per request."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        # Runs in the front-end process before the request reaches the engine core; a
        # ValueError becomes a VLLMValidationError (a client error), not a crash.
        _rules_of(sampling_params)

    def __init__(
        self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool
    ) -> None:
        self.rows: dict[int, RowState] = {}
        self._failed_once = False

    def is_argmax_invariant(self) -> bool:
        # Bans and forced tokens change the greedy choice.
        return False

    @staticmethod
    def _new_state(
        params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> RowState | None:
        try:
            rules = _rules_of(params)
            if rules is None:
                return None
            # A preempted request comes back through here with its output list: the
            # state is rebuilt from the prompt and the tokens generated so far.
            return RowState(rules, prompt_ids, output_ids)
        except Exception:
            log.exception("logits rules could not be set up for a request; ignoring them")
            return None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        num_rows = logits.shape[0]
        for index, state in self.rows.items():
            if index >= num_rows:
                continue
            try:
                row = logits[index]
                out = state.process(row)
                if out.data_ptr() != row.data_ptr():
                    row.copy_(out)
            except Exception:
                # Contain it to this row; never take the engine down.
                if not self._failed_once:
                    self._failed_once = True
                    log.exception("logits rules failed for batch row %d; row left as is", index)
        return logits
