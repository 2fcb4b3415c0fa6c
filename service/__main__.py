"""`python -m service [serve options] | migrate | audit`: see process/cli.py."""

import sys

from .process.cli import main

sys.exit(main(sys.argv[1:]))
