"""Lua scripts, as ``.lua`` files next to this module, loaded once per client."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import msgspec
from redis.commands.core import AsyncScript

from quantum_trader.bus.connection import Redis


@cache
def source(name: str) -> str:
    """The text of ``<name>.lua``."""
    return files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def register(redis: Redis, name: str) -> AsyncScript:
    """A script object that runs by EVALSHA and reloads itself after a server restart."""
    script: AsyncScript = redis.register_script(source(name))
    return script


# A batch's per-entry data travels as one MessagePack argument (``cmsgpack.unpack`` in the
# script): redis-py spends more time packing thousands of arguments than the server unpacking one.
pack = msgspec.msgpack.Encoder().encode
