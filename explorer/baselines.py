"""Entry point of ``python -m explorer.baselines``: the command is :mod:`explorer.cli.baselines`."""
import sys

from .cli.baselines import main

if __name__ == "__main__":
    sys.exit(main())
