"""``python -m modelhash`` runs the ``modelhash`` command."""

from modelhash._cli import main

main()
