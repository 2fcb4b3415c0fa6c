"""The app factory (as in Flask's tutorial): settings, the pool, the cache, the routes."""

from __future__ import annotations

from flask import Flask

from . import audit, auth, logs, metrics
from .cache import UserCache
from .config import Settings
from .db import Database
from .errors import register_error_handlers
from .users import Users

MAX_BODY_BYTES = 64 * 1024
EXTENSION = "cachestack.users"  # where an app keeps its Users, in app.extensions
AUDITOR = "cachestack.auditor"  # and its consistency auditor's thread (None when off)


def users_of(app: Flask) -> Users:
    """The use cases `app` serves: its one Postgres pool and its one cache."""
    return app.extensions[EXTENSION]


def create_app(settings: Settings | None = None) -> Flask:
    """App factory: one Postgres pool and one Redis client per process, made lazily."""
    # Imported here, as Flask's tutorial imports its blueprints: both doors import users_of.
    from . import api, hotpath

    settings = settings or Settings.from_env()
    logs.configure()
    app = Flask(__name__)
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
