"""The service's command line: `python -m service` serves the API (serve.py);
`python -m service migrate` brings the database's schema up to date first (migrate.py);
`python -m service stream` invalidates the cache for every change to users (stream.py);
`python -m service audit` checks every cached user against Postgres once (audit.py).

Each command is imported only when it runs: serving must set up its metrics directory before
anything loads the metrics (serve.py), and the other two are single processes.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    commands = (["migrate"], ["stream"], ["audit"])
    command, rest = (argv[0], argv[1:]) if argv[:1] in commands else ("", argv)
    if command == "migrate":
        from . import migrate

        return migrate.main(rest)
    if command == "audit":
        from . import audit

        return audit.main(rest)
    if command == "stream":
        from . import stream

        return stream.main(rest)
    from . import serve

    return serve.main(rest)
