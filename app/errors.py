"""Client errors and their mapping to HTTP, in one place.

Client mistakes are 4xx and name the parameter; a dead or loading engine is 503; anything
else is a 500 that logs the traceback and never leaks it.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.engines.base import EngineDeadError
from param_mapping import ParameterError

log = logging.getLogger(__name__)


class HTTPError(Exception):
    """An error with a status code and a message for the client."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        parameter: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.parameter = parameter
        self.headers = headers


def _body(detail: str, parameter: str | None) -> dict[str, str]:
    body = {"detail": detail}
    if parameter is not None:
        body["parameter"] = parameter
    return body


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, exc: HTTPError) -> JSONResponse:
        return JSONResponse(
            _body(exc.detail, exc.parameter), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(ParameterError)
    async def _parameter_error(_: Request, exc: ParameterError) -> JSONResponse:
        return JSONResponse(_body(exc.message, exc.parameter), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input, which cannot be JSON-encoded when
        # it is NaN or Infinity (a 500); location, message and type say enough.
        detail = [
            {
                "loc": list(e.get("loc", ())),
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return JSONResponse(_body(f"Engine unavailable: {exc}", None), status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse({"detail": "Internal server error"}, status_code=500)
