"""Entry point of ``python -m explorer.train``: the command is :mod:`explorer.cli.train`."""
import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
