"""Pure translation from Kaito's transformers-style payload to engine parameters.

Never imports FastAPI or vLLM and never starts an engine.
"""

from param_mapping.errors import ParameterError
from param_mapping.generate_kwargs import KAITO_DEFAULTS, merge_with_defaults, to_generation_plan
from param_mapping.spec import BeamSpec, GenerationPlan, SamplingSpec, SpecialTokens

__all__ = [
    "KAITO_DEFAULTS",
    "BeamSpec",
    "GenerationPlan",
    "ParameterError",
    "SamplingSpec",
    "SpecialTokens",
    "merge_with_defaults",
    "to_generation_plan",
]
