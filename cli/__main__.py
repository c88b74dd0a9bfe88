"""``python -m sslrun.cli`` (what ``torchrun -m sslrun.cli train ...`` runs on every rank)."""

from sslrun.cli import main

main()
