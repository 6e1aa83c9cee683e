"""
The dashboard's job history page, C{/jobs}: every job, filtered and paged.

The route lives in L{roller.web.dashboard.Dashboard} and hands over here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.iweb import IRequest

from roller.auth.dashboard import Viewer

if TYPE_CHECKING:
    from roller.web.dashboard import Dashboard


async def jobs_page(dashboard: Dashboard, request: IRequest, viewer: Viewer) -> bytes:
    """The C{/jobs} page."""
    return dashboard.render(request, "jobs.html", viewer, section="jobs")
