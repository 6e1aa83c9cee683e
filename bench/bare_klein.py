"""
The baseline for bench/submit.py: a bare Klein app, one POST route (the
same path pattern as roller's Taskcluster form) answering C{{"ok": true}},
on twisted.web's Site and the default reactor, logging like twistd does.

    python bench/bare_klein.py --port 8001
"""

from __future__ import annotations

import argparse
import sys

from klein import Klein
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.server import Site

app = Klein()


@app.route("/api/v1/workers/<worker_id>/group/<worker_group>/jobs", methods=["POST"])
async def submit(request, worker_id: str, worker_group: str) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return b'{"ok": true}'


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # twistd -n logs to stdout (access lines included); do the same so the
    # comparison with roller is fair.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    site = Site(app.resource())
    site.noisy = False
    serverFromString(reactor, f"tcp:{args.port}:interface=127.0.0.1").listen(site)
    reactor.run()


if __name__ == "__main__":
    main()
