"""Entry point of ``python -m explorer.search``: the command is :mod:`explorer.cli.search`."""
import sys

from .cli.search import main

if __name__ == "__main__":
    sys.exit(main())
