"""The WSGI entry point the server imports in each worker process."""

from .app import create_app

app = create_app()
