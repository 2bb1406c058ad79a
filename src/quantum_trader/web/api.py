"""The JSON API: everything the CLI shows (read, open), and the operator's controls (token required)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """The stream server answers."""
    await request.app.state.redis.ping()
    return {"ok": True}
