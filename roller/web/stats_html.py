"""
The dashboard's charts: the C{/stats} page and the fleet page's sparkline.

The route lives in L{roller.web.dashboard.Dashboard} and hands over here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from markupsafe import Markup
from twisted.web.iweb import IRequest

from roller.auth.dashboard import Viewer

if TYPE_CHECKING:
    from roller.web.dashboard import Dashboard


async def stats_page(dashboard: Dashboard, request: IRequest, viewer: Viewer) -> bytes:
    """The C{/stats} page."""
    return dashboard.render(request, "stats.html", viewer, section="stats")


async def fleet_sparkline(dashboard: Dashboard) -> Markup:
    """The fleet page's small chart of recent jobs (empty until there is one)."""
    return Markup("")
