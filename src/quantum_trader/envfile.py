"""The one reader of systemd ``EnvironmentFile`` syntax: the settings file and the secrets file.

Accepted, line by line (surrounding blanks ignored):

- blank lines and lines starting with ``#``: skipped;
- ``NAME=value`` or ``export NAME=value``: the value is everything after the first ``=``;
  one pair of matching outer quotes (``'…'`` or ``"…"``) is removed, nothing inside is
  unescaped, and a ``#`` after the value is part of it (no trailing comments);
- a line without ``=``: skipped.

Refused with a ``ConfigError`` naming the file and the line, rather than guessed at:

- a comment starting with ``;`` (systemd allows it; other readers take it for a name);
- a value continued on the next line with a trailing backslash;
- bytes that are not UTF-8.
"""

from __future__ import annotations

from pathlib import Path

from quantum_trader.errors import ConfigError


def read_env_file(path: Path, what: str = "env file") -> dict[str, str]:
    """``NAME -> value`` of every assignment in ``path``, in file order (the last of a repeated name wins).

    ``what`` names the file in errors (``env file``, ``secrets file``). A file that cannot be
    opened raises the ``OSError`` (``FileNotFoundError``, ``PermissionError``) for the caller
    to word; a form the reader refuses raises ``ConfigError``.
    """
    return parse_env(path.read_bytes(), f"{what} {path}")


def parse_env(data: bytes | str, origin: str) -> dict[str, str]:
    """``NAME -> value`` of the assignments in ``data``; ``origin`` (``env file /etc/x.env``) names it in errors."""
    text = _decode(data, origin) if isinstance(data, bytes) else data
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(";"):
            raise ConfigError(f"{origin}, line {number}: start comments with '#', not ';'")
        if line.endswith("\\"):
            raise ConfigError(f"{origin}, line {number}: a value continued with a backslash; put it on one line")
        if "=" not in line:
            continue
        name, _, value = line.partition("=")
        values[name.removeprefix("export ").strip()] = _unquote(value.strip())
    return values


def _unquote(value: str) -> str:
    """``value`` without one pair of matching outer quotes."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _decode(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{origin}, line {line}: byte 0x{data[exc.start]:02x} at column {column} is not UTF-8; "
            "save the file as UTF-8"
        ) from None
