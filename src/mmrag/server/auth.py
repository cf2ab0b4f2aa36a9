"""The bearer token: where it comes from, and the checks that guard writes (and closed reads)."""

from __future__ import annotations

import hmac
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mmrag.config import ConfigError

log = logging.getLogger(__name__)

TOKEN_ENV = "MMRAG_TOKEN"
MIN_TOKEN_CHARS = 16

bearer = HTTPBearer(
    auto_error=False,
    description=f"The token the server was started with ({TOKEN_ENV} or --token-file).",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


class TokenError(ConfigError):
    """The configured token is unusable (empty, too short, unreadable file)."""


def load_token(
    token_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The token from `token_file` if given, else from $MMRAG_TOKEN; None if neither is set.

    A token file readable by group or others is accepted with a warning."""
    environ = os.environ if environ is None else environ
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as e:
            raise TokenError(f"cannot read the token file {path}: {e}") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is readable by others; chmod 600 it", path)
        source = str(path)
    elif TOKEN_ENV in environ:
        token, source = environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(
            f"the token from {source} has {len(token)} characters; use at least "
            f"{MIN_TOKEN_CHARS} (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)"
        )
    return token


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


class BearerAuth:
    """Compares a request's bearer token with the server's, in constant time."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode("utf-8") if token is not None else None

    @property
    def configured(self) -> bool:
        return self._token is not None

    def check(self, credentials: HTTPAuthorizationCredentials | None, action: str) -> None:
        if self._token is None:
            raise HTTPException(
                403,
                f"{action} is disabled: the server was started without a token "
                f"(set {TOKEN_ENV} or --token-file), so the memory is open read-only",
            )
        if credentials is None:
            raise _unauthorized(f"{action} needs 'Authorization: Bearer <token>'")
        given = credentials.credentials.encode("utf-8")
        if not hmac.compare_digest(given, self._token):
            raise _unauthorized("the bearer token is not the server's token")

    def dependency(self, action: str) -> Callable[[Credentials], Awaitable[None]]:
        """A FastAPI dependency that lets the request through only with the token (async:
        it runs on the event loop, not in a worker thread)."""

        async def require_token(credentials: Credentials) -> None:
            self.check(credentials, action)

        return require_token
