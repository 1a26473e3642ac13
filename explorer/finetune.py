"""Entry point of ``python -m explorer.finetune``: the command is :mod:`explorer.cli.finetune`."""
import sys

from .cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
