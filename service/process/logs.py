"""One log format for every process of the service: the server's main process and its workers."""

import logging


def configure() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
