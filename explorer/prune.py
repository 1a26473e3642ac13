"""Entry point of ``python -m explorer.prune``: the command is :mod:`explorer.cli.prune`."""
import sys

from .cli.prune import main

if __name__ == "__main__":
    sys.exit(main())
