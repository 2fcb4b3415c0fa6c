"""The app factory (as in Flask's tutorial): settings, the pool, the cache, the routes."""

from __future__ import annotations

from flask import Flask, Request
from werkzeug.exceptions import NotFound
from werkzeug.routing import MapAdapter

from . import audit, auth, logs, metrics
from .cache import UserCache
from .config import Settings
from .db import Database
from .errors import register_error_handlers
from .users import Users

MAX_BODY_BYTES = 64 * 1024
EXTENSION = "cachestack.users"  # where an app keeps its Users, in app.extensions
AUDITOR = "cachestack.auditor"  # and its consistency auditor's thread (None when off)


# What a path segment never is in a route: empty (a doubled or trailing slash), "." or "..".
NOT_SEGMENTS = frozenset({"", ".", ".."})


def canonical(path: str) -> bool:
    """Whether `path` is spelled as a route is: "/" and segments, none of them NOT_SEGMENTS."""
    first, *segments = path.split("/")
    return first == "" and bool(segments) and NOT_SEGMENTS.isdisjoint(segments)


class CanonicalFlask(Flask):
    """Flask whose router takes a path only as it is written: any other is a 404.

    Werkzeug's router reads some paths otherwise: it drops leading slashes (`//users` is
    routed as `/users`, whatever its `merge_slashes`) and merges doubled ones elsewhere. So a
    route could be reached by a spelling that whatever judged the request before it (the token
    check, a proxy's rules, the logs) saw as another path. Here every request that reaches a
    route spells it exactly, as the hot path (hotpath.py) only ever takes exact spellings too.
    Checked when Flask makes the request's URL adapter, before it routes, so the 404 is its
    own, answered by the app's error handlers."""

    def create_url_adapter(self, request: Request | None) -> MapAdapter | None:
        if request is not None and not canonical(request.environ.get("PATH_INFO", "")):
            raise NotFound()
        return super().create_url_adapter(request)


def users_of(app: Flask) -> Users:
    """The use cases `app` serves: its one Postgres pool and its one cache."""
    return app.extensions[EXTENSION]


def create_app(settings: Settings | None = None) -> Flask:
    """App factory: one Postgres pool and one Redis client per process, made lazily."""
    # Imported here, as Flask's tutorial imports its blueprints: both doors import users_of.
    from . import api, hotpath

    settings = settings or Settings.from_env()
    logs.configure()
    app = CanonicalFlask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    password = settings.database_password_file
    database = Database(settings.database_url, settings.db_pool_size,
                        settings.db_connect_timeout, settings.db_statement_timeout_ms,
                        password.read if password else None)
    cache = UserCache(settings, database)
    app.extensions[EXTENSION] = Users(database, cache, settings.batching)
    app.extensions[AUDITOR] = audit.start_sampler(settings, cache)
    app.register_blueprint(api.bp)
    register_error_handlers(app)
    # The token check stands in front of both doors (the hot routes and Flask), and the
    # timing in front of it, so that refused requests are counted too.
    app.wsgi_app = metrics.timed(auth.require_token(hotpath.serve_hot_routes(app),
                                                    settings.api_tokens,
                                                    settings.api_tokens_file))
    return app
