"""vLLM's own OpenAI serving layer, mounted on our AsyncLLM.

Part of the vLLM backend (it imports vLLM, lazily): vLLM's ``init_app_state`` builds its
serving objects (``OpenAIServingCompletion``, ``OpenAIServingChat``,
``OpenAIServingModels``) on the engine we already run, exactly as vLLM's api_server does
on its own. That brings vLLM's request validation, chat templates, tool calling,
structured output, logprobs, the model's generation_config defaults and OpenAI's error
shapes, with one engine and one batch for /chat and /v1.

The HTTP side (app/openai_api.py) hands us the JSON body and gets back either a reply
(status, JSON) or an async iterator of server-sent-event strings; our admission, time
limits, API key and request ids wrap both there.
"""

import argparse
import logging
from collections.abc import AsyncIterator
from typing import Any

from app import tracing
from app.adapters import NO_ADAPTERS, ServedAdapters
from app.settings import Settings
from param_mapping import ParameterError

log = logging.getLogger(__name__)

Reply = tuple[int, dict[str, Any]] | AsyncIterator[str]


def vllm_server_args(
    settings: Settings, adapters: ServedAdapters = NO_ADAPTERS
) -> argparse.Namespace:
    """vLLM api_server's arguments with their defaults, for our model and chat template,
    and each adapter as a LoRA module that requests select by ``model`` (Kaito's vLLM
    runtime registers them the same way; the combined default is /chat's own)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", settings.model, "--served-model-name", settings.model_name]
    if settings.chat_template:
        argv += ["--chat-template", settings.chat_template]
    if adapters:
        # In name order: vLLM numbers them 1..N as ServedAdapters.lora_id does, so /v1
        # and /chat share the engine's adapter slots.
        argv += ["--lora-modules", *(f"{a.name}={a.path}" for a in adapters.adapters)]
    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)


class VLLMOpenAIServer:
    def __init__(self, state: Any) -> None:
        self._completion = state.openai_serving_completion
        self._chat = state.openai_serving_chat
        self._models = state.openai_serving_models

    @classmethod
    async def create(
        cls, llm: Any, settings: Settings, adapters: ServedAdapters = NO_ADAPTERS
    ) -> "VLLMOpenAIServer":
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        state = State()
        tasks = await llm.get_supported_tasks()
        await init_app_state(llm, state, vllm_server_args(settings, adapters), tasks)
        return cls(state)

    async def models(self) -> dict[str, Any]:
        return (await self._models.show_available_models()).model_dump()  # type: ignore[no-any-return]

    async def completions(self, body: dict[str, Any], raw_request: Any) -> Reply:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return await self._serve(
            CompletionRequest, self._completion.create_completion, body, raw_request
        )

    async def chat_completions(self, body: dict[str, Any], raw_request: Any) -> Reply:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return await self._serve(
            ChatCompletionRequest, self._chat.create_chat_completion, body, raw_request
        )

    @staticmethod
    async def _serve(schema: Any, handler: Any, body: dict[str, Any], raw_request: Any) -> Reply:
        """What vLLM's api_router does for these routes, minus FastAPI's body parsing."""
        from pydantic import ValidationError
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMValidationError

        try:
            request = schema.model_validate(body)
        except ValidationError as exc:
            # vLLM's server answers a schema error with a 400 too (the HTTP layer writes
            # it in OpenAI's shape).
            errors = exc.errors()
            param = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
            raise ParameterError(param or "body", str(exc)) from exc
        try:
            # vLLM's layer validates, templates, tokenizes and (unless streaming) generates:
            # one span. vLLM's engine span hangs under the request's span, because vLLM
            # reads the request's traceparent (rewritten by tracing.TracingMiddleware).
            with tracing.span("generate"):
                result = await handler(request, raw_request)
        except VLLMValidationError as exc:
            # Raised past the handler (SamplingParams checks); vLLM's server answers 400.
            raise ParameterError(exc.parameter or "body", str(exc)) from exc
        if isinstance(result, ErrorResponse):
            return result.error.code, result.model_dump()
        if hasattr(result, "model_dump"):
            return 200, result.model_dump()
        return result  # type: ignore[no-any-return]  # the SSE stream
