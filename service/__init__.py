"""cachestack's user service: Flask over PostgreSQL with a Redis cache.

The app factory lives in `service.app`; this package stays import-free so that
`python -m service` can prepare the process (metrics directory) before anything loads.
"""
