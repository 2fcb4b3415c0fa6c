"""The app factory (as in Flask's tutorial), the composition root: it builds each layer from
its own settings and wires them together; only the entry points (wsgi.py, the tests) import it."""

from __future__ import annotations

from flask import Flask

from ..cache import audit
from ..cache.policy import UserCache
from ..postgres import statements
from ..postgres.pool import Database
from ..usecases.users import Users
from ..web import auth, hotpath, routes, timing
from ..web.errors import register_error_handlers
from ..wire.client import RedisClient
from . import logs
from .config import Settings

MAX_BODY_BYTES = 64 * 1024
AUDITOR = "cachestack.auditor"  # where an app keeps its consistency auditor's thread (None: off)


def create_app(settings: Settings | None = None) -> Flask:
    """App factory: one Postgres pool and one Redis client per process, made lazily."""
    settings = settings or Settings.from_env()
    logs.configure()
    app = routes.CanonicalFlask("service")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    database = Database(settings.postgres, statements.PREPARED)
    cache = UserCache(settings.cache, RedisClient(settings.redis), database)
    app.extensions[routes.EXTENSION] = Users(database, cache, settings.batching,
                                             settings.stream_slot)
    app.extensions[AUDITOR] = audit.start_sampler(
        cache, audit.own_database(settings.postgres), settings.cache.audit_per_second)
    app.register_blueprint(routes.bp)
    register_error_handlers(app)
    # The token check stands in front of both doors (the hot routes and Flask), and the
    # timing in front of it, so that refused requests are counted too.
    app.wsgi_app = timing.timed(auth.require_token(hotpath.serve_hot_routes(app),
                                                    settings.api_tokens,
                                                    settings.api_tokens_file))
    return app
