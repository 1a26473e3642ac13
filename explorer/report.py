"""Entry point of ``python -m explorer.report``: the command is :mod:`explorer.cli.report`."""
import sys

from .cli.report import main

if __name__ == "__main__":
    sys.exit(main())
