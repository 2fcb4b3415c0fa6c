"""The WSGI entry point the server imports in each worker process."""

import gc

from .process.factory import create_app

app = create_app()
# What exists now (modules, the app, its routes) lives as long as the worker: the collector
# need not scan it again on every full collection, which would stall a request now and then
# (bench/RESULTS.md, "Measurements behind the code").
gc.freeze()
