"""Optional API key for generation routes (KAITO_API_KEY)."""

import hmac

from fastapi import Request

from app.errors import HTTPError


async def require_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # Constant-time comparison: response timing must not reveal how much of a guess matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), key.get_secret_value().encode()
    ):
        raise HTTPError(
            401,
            "Missing or invalid API key: send Authorization: Bearer <key>.",
            headers={"WWW-Authenticate": "Bearer"},
        )
