"""The admin API under /admin (placeholder: routes are added by the admin work)."""
from __future__ import annotations

from aiohttp import web


def add_admin_routes(app: web.Application) -> None:
    """Register /admin/... routes on the app (before the catch-all proxy route)."""
