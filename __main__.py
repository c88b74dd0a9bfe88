"""``python -m sslrun`` is the same as the ``sslrun`` console script."""

from sslrun.cli import main

main()
