"""transformers' logits rules that vLLM lacks, as one vLLM V1 logits processor.

- ``rules``: the rules themselves, in plain torch, copied from transformers'
  ``generation/logits_process.py`` op for op, plus the per-request state (``RowState``).
  No vLLM import: unit tests compare it with transformers directly.
- ``routing``: which rules the processor must run for a request and which vLLM sampling
  steps must be neutralised so the result is transformers' (vLLM-specific, no vLLM
  import).
- ``vllm_processor``: the ``vllm.v1.sample.logits_processor.LogitsProcessor`` adapter that
  the engine core loads by name (``PROCESSOR_FQCN``). Imports vLLM.
"""

# The engine core imports the processor by this name (AsyncEngineArgs.logits_processors).
PROCESSOR_FQCN = "app.engines.processors.vllm_processor:TransformersRulesProcessor"
# SamplingParams.extra_args key that carries one request's rule values.
EXTRA_ARGS_KEY = "kaito_transformers_rules"
