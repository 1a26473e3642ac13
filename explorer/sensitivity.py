"""Entry point of ``python -m explorer.sensitivity``: the command is :mod:`explorer.cli.sensitivity`."""
import sys

from .cli.sensitivity import main

if __name__ == "__main__":
    sys.exit(main())
