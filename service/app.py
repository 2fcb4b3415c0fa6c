"""The app factory (as in Flask's tutorial): settings, the pool, the cache, the routes."""

from __future__ import annotations

import logging

from flask import Flask

from . import api, hotpath, metrics
from .cache import UserCache
from .config import Settings
from .db import Database
from .errors import register_error_handlers
from .users import Users

MAX_BODY_BYTES = 64 * 1024


def create_app(settings: Settings | None = None) -> Flask:
    """App factory: one Postgres pool and one Redis client per process, made lazily."""
    settings = settings or Settings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    database = Database(settings.database_url, settings.db_pool_size,
                        settings.db_connect_timeout, settings.db_statement_timeout_ms)
    cache = UserCache(settings, database)
    app.extensions["cachestack.users"] = Users(database, cache)
    app.register_blueprint(api.bp)
    register_error_handlers(app)
    app.wsgi_app = metrics.timed(hotpath.serve_hot_routes(app))
    return app
