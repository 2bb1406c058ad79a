"""The secrets file (``QT_SECRETS_FILE``): read once, judged once, for every secret it holds.

Exchange credentials, the web API's token and the alert URLs all live there, never in the
environment or the settings. One reader and one permission rule serve them all: a file other
users can open (or its group rewrite) stops testnet and live start-up with the fix, and is a
warning in paper mode, where no order reaches an exchange.
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

from quantum_trader.envfile import read_env_file
from quantum_trader.errors import ConfigError
from quantum_trader.logs import get_logger
from quantum_trader.settings import Mode, secrets_file_problem

log = get_logger("secrets")


def read_secrets(path: Path) -> tuple[dict[str, str], int]:
    """The file's variables and its mode bits; ConfigError (with the fix) when it is missing or unreadable."""
    try:
        info = path.stat()
        values = read_env_file(path, "secrets file")
    except FileNotFoundError:
        raise ConfigError(f"secrets file {path} (QT_SECRETS_FILE) does not exist; create it, mode 0640") from None
    except PermissionError:
        raise ConfigError(
            f"secrets file {path} is not readable by this user (uid {os.getuid()}); "
            f"run: chgrp <service-group> {path} && chmod 0640 {path}"
        ) from None
    return values, info.st_mode


def check_private(path: Path, st_mode: int, mode: Mode) -> None:
    """Refuse (testnet, live) or warn about (paper) a secrets file others can open or its group rewrite."""
    problem = secrets_file_problem(st_mode)
    if problem is None:
        return
    fix = f"run: chown root:{own_group()} {path} && chmod 0640 {path}"
    if mode != "paper":
        raise ConfigError(f"secrets file {path} is {problem}, so QT_MODE={mode} will not start; {fix}")
    log.warning("secrets_file_world_readable", path=str(path), problem=problem, fix=fix)


def own_group() -> str:
    """This process's group: the one that must be able to read the secrets file."""
    try:
        return grp.getgrgid(os.getgid()).gr_name
    except KeyError:
        return str(os.getgid())
