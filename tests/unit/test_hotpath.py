"""The hot path (service/web/hotpath.py) refuses, at start, an app whose requests would run
something it skips: a request hook of the app or of a blueprint, or a request signal's
receiver. Answering in front of Flask is compared with Flask itself in
tests/service/test_hotpath.py."""

from __future__ import annotations

import pytest
from flask import Blueprint, Flask, request_started

from service.web.hotpath import serve_hot_routes


def ignore(*args: object, **kwargs: object) -> None:
    pass


@pytest.mark.parametrize("hook", ["before_request", "after_request", "teardown_request",
                                  "teardown_appcontext", "url_value_preprocessor",
                                  "url_defaults"])
def test_an_app_with_a_request_hook_is_refused_at_start(hook: str) -> None:
    hooked = Flask(hook)
    getattr(hooked, hook)(ignore)
    with pytest.raises(RuntimeError, match=f"skip this app's {hook}: put that work in a WSGI"):
        serve_hot_routes(hooked)


def test_a_blueprints_request_hook_is_refused_at_start() -> None:
    blueprint = Blueprint("hooked", __name__)
    blueprint.before_request(ignore)
    hooked = Flask("hooked")
    hooked.register_blueprint(blueprint)
    with pytest.raises(RuntimeError, match="skip this app's before_request"):
        serve_hot_routes(hooked)


def test_an_app_whose_requests_a_signal_receiver_watches_is_refused_at_start() -> None:
    watched = Flask("watched")
    request_started.connect(ignore, watched)
    try:
        with pytest.raises(RuntimeError, match="skip this app's request-started"):
            serve_hot_routes(watched)
    finally:
        request_started.disconnect(ignore, watched)

