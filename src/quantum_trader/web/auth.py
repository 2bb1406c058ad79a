"""The operator's token for the API's state-changing endpoints: loaded from the secrets file, checked per request.

The token is ``QT_WEB_TOKEN`` in the secrets file (``QT_SECRETS_FILE``), never the environment
or the settings: a process listing or a settings dump must not show it. The file gets the same
checks as the exchange credentials (``exchanges.ccxt.credentials``). A request proves it with
``Authorization: Bearer <token>``, compared in constant time. Every attempt, accepted or refused,
is one log line with the client's address, the method and the path; the token never is.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from quantum_trader.errors import ConfigError
from quantum_trader.logs import get_logger
from quantum_trader.secrets_file import check_private, read_secrets
from quantum_trader.settings import Mode

log = get_logger("web")

TOKEN_NAME = "QT_WEB_TOKEN"
MIN_TOKEN_CHARS = 16  # 16 random characters are past guessing over HTTP; `openssl rand -hex 32` gives 64
GENERATE = "openssl rand -hex 32"
NO_TOKEN = (
    f"state-changing endpoints are disabled: no {TOKEN_NAME} is configured. Add {TOKEN_NAME}=<random, e.g. from "
    f"`{GENERATE}`> to the secrets file (QT_SECRETS_FILE, mode 0640) and restart the web server"
)

_bearer = HTTPBearer(auto_error=False, description=f"{TOKEN_NAME} from the secrets file")


def load_token(path: Path | None, mode: Mode = "live") -> SecretStr | None:
    """``QT_WEB_TOKEN`` from the secrets file at ``path``; None when no file is set or it holds no token.

    A file other users can open (or its group rewrite) stops testnet and live start-up with the
    fix, and is a warning in paper mode, as for the exchange credentials. A token that is empty,
    short or not plain ASCII is a ``ConfigError`` saying how to make one.
    """
    if path is None:
        return None
    values, st_mode = read_secrets(path)
    if TOKEN_NAME not in values:
        return None
    check_private(path, st_mode, mode)
    token = values[TOKEN_NAME]
    # A header carries printable ASCII without spaces reliably; anything else is a copy-paste accident.
    if len(token) < MIN_TOKEN_CHARS or not all("!" <= char <= "~" for char in token):
        raise ConfigError(
            f"{TOKEN_NAME} in secrets file {path} must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
            f"without spaces (it has {len(token)}); generate one with: {GENERATE}"
        )
    return SecretStr(token)


def client_address(request: Request) -> str:
    """The peer's address as the server saw it (never a forwarded header: anyone can send one)."""
    return request.client.host if request.client else "unknown"


async def operator(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """FastAPI dependency of every state-changing endpoint: who asks (``web:<address>``), once the token matches.

    No token configured: 403 saying how to configure one. A missing or wrong token: 401 with
    ``WWW-Authenticate: Bearer``. The handler runs only after this returns, so a refused
    request changes nothing.
    """
    source = client_address(request)
    expected: SecretStr | None = request.app.state.token
    if expected is None:
        _audit(request, source, refused="no token configured")
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=NO_TOKEN)
    if credentials is None:
        _audit(request, source, refused="no bearer token")
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="this endpoint needs the header Authorization: Bearer <QT_WEB_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Header values arrive as latin-1 text: their bytes are what the client sent.
    given = credentials.credentials.encode("latin-1", "replace")
    if not secrets.compare_digest(given, expected.get_secret_value().encode("ascii")):
        _audit(request, source, refused="wrong token")
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="the bearer token does not match QT_WEB_TOKEN",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    _audit(request, source)
    return f"web:{source}"


def _audit(request: Request, source: str, refused: str = "") -> None:
    # Warning level for both: who changed the pipeline (or tried) must survive QT_LOG_LEVEL=warning.
    log.warning(
        "web_auth",
        outcome="refused" if refused else "accepted",
        reason=refused or None,
        source=source,
        method=request.method,
        path=request.url.path,
    )
