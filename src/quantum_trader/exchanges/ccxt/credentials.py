"""API credentials from the secrets file (``QT_SECRETS_FILE``), never from the environment.

The file is in systemd ``EnvironmentFile`` syntax (``BINANCE_API_KEY=…`` like the seed's
``testnet.env``), read by ``quantum_trader.envfile``; values are kept as ``SecretStr``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from quantum_trader.errors import ConfigError
from quantum_trader.logs import get_logger
from quantum_trader.secrets_file import check_private, read_secrets
from quantum_trader.settings import Mode

log = get_logger("exchange")


@dataclass(frozen=True, slots=True)
class Credentials:
    """API credentials; their repr never shows the values."""

    api_key: SecretStr
    secret: SecretStr
    password: SecretStr | None = None

    def values(self) -> list[str]:
        """The secret values (to scrub them from text)."""
        out = [self.api_key.get_secret_value(), self.secret.get_secret_value()]
        if self.password is not None:
            out.append(self.password.get_secret_value())
        return out


def credential_names(exchange: str) -> tuple[str, str, str]:
    """Variable names in the secrets file: ``BINANCE_API_KEY``, ``BINANCE_API_SECRET``, ``BINANCE_API_PASSWORD``."""
    prefix = re.sub(r"[^A-Z0-9]", "_", exchange.upper())
    return f"{prefix}_API_KEY", f"{prefix}_API_SECRET", f"{prefix}_API_PASSWORD"


def load_credentials(path: Path | None, exchange: str, mode: Mode = "live") -> Credentials:
    """Read the exchange's API key and secret from the secrets file; ConfigError says what to fix.

    A file other users can open (or its group rewrite) stops testnet and live start-up with
    the fix; in paper mode, where no order reaches an exchange, it is a warning.
    """
    key_name, secret_name, password_name = credential_names(exchange)
    if path is None:
        hint = " (they are not read from the environment)" if key_name in os.environ else ""
        raise ConfigError(
            f"QT_EXCHANGE={exchange} needs API credentials{hint}: set QT_SECRETS_FILE to a file with "
            f"{key_name}=... and {secret_name}=..., owned by the service user, mode 0640"
        )
    values, st_mode = read_secrets(path)
    check_private(path, st_mode, mode)
    missing = [name for name in (key_name, secret_name) if not values.get(name)]
    if missing:
        raise ConfigError(f"secrets file {path} has no {' or '.join(missing)}; add {missing[0]}=... to it")
    password = values.get(password_name)
    return Credentials(
        api_key=SecretStr(values[key_name]),
        secret=SecretStr(values[secret_name]),
        password=SecretStr(password) if password else None,
    )
