"""Entry point of ``python -m explorer.bench``: the command is :mod:`explorer.cli.bench`."""
import sys

from .cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
