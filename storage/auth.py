"""Who may read and write: one shared token (``CHEXMASK_API_TOKEN``), when set.

Programs send ``Authorization: Bearer <token>``. A browser cannot add that
header to its image and page requests, so it gives the token once as
``?token=...``; the app answers with an HttpOnly, SameSite=Strict cookie that
carries it from then on. Writes made with the cookie must also carry a form
field derived from the token (``csrf_value``), which another site cannot read.
"""

from __future__ import annotations

import hashlib
import hmac
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

COOKIE = "chexmask_token"
COOKIE_MAX_AGE = 30 * 24 * 3600
_BEARER = HTTPBearer(auto_error=False)


def same(given: str | None, token: str) -> bool:
    # Constant-time comparison: the token must not leak through response timing.
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def authorized(request: Request, token: str | None) -> bool:
    """Whether the request carries the token, as a bearer header or the cookie."""
    if token is None:
        return True
    return same(bearer(request), token) or same(request.cookies.get(COOKIE), token)


def csrf_value(token: str | None) -> str:
    """The form field a cookie-authorised write must carry ("" when no token is set)."""
    if token is None:
        return ""
    return hmac.new(token.encode(), b"chexmask-web-write", hashlib.sha256).hexdigest()[:32]


def api_guard(token: str | None):
    """Dependency for the JSON routes: 401 with ``WWW-Authenticate: Bearer`` without the token."""

    def guard(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        # _credentials only documents the bearer scheme in OpenAPI; the check reads both ways.
        if not authorized(request, token):
            raise HTTPException(
                HTTPStatus.UNAUTHORIZED,
                "missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return guard
