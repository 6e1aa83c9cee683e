"""
roller's HTTP layer: the Klein REST API, the dashboard, SSE events and the
hardened twisted.web server (L{roller.web.http.RollerSite}) they run on.
"""
