"""``python -m client._cli`` runs the ``modelhash`` command."""

from client._cli import main

main()
