"""Command-line front ends: one argparse ``main`` per command (``python -m explorer.<command>``
runs the thin entry point of the same name in ``explorer/``, which calls the ``main`` here). Each
parses flags, calls the library (:mod:`explorer.training`, :mod:`explorer.analysis`, the core) and
prints text or JSON. Nothing imports these modules; they import the library."""
