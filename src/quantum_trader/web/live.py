"""The live page (``/``) and the event stream it listens to."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from quantum_trader.web.app import STATIC

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The dashboard page (static HTML; its script fetches the API and listens to the events)."""
    return FileResponse(STATIC / "index.html")
