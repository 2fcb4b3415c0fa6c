"""WSGI middleware that times every request, whichever door answers it (and the refusals of
the token check in front of both)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..metrics import REQUEST_LATENCY

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# Label values come from the client, so they are kept to a known few: any other method
# would add a time series per made-up method.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def timed(wsgi_app: WSGIApplication) -> WSGIApplication:
    """WSGI middleware that observes each request's latency.

    It wraps Flask's `wsgi_app` rather than using request hooks, which cost several times
    more Python calls per request than this on the hottest paths.
    """

    def observed(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        status = "500"

        def remember_status(code: str, headers: list, *exc_info: object) -> object:
            nonlocal status
            status = code[:3]
            return start_response(code, headers, *exc_info)

        body = wsgi_app(environ, remember_status)
        method = environ["REQUEST_METHOD"]
        series = (method if method in METHODS else "other", status)
        histogram = histograms.get(series)
        if histogram is None:
            histogram = histograms[series] = REQUEST_LATENCY.labels(*series)
        histogram.observe(time.perf_counter() - started)
        return body

    # Each series' histogram, as labels() gives it (which takes a lock and builds its key on
    # every call); as many as methods and statuses, which METHODS keeps few.
    histograms: dict[tuple[str, str], Any] = {}
    return observed
