"""``python -m modelhash._cli`` also runs the ``modelhash`` command."""

from modelhash._cli import main

main()
