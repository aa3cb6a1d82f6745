"""``python -m caviar.cli``: the ``caviar`` command (how caviar starts its own processes)."""

from caviar.cli import main

main()
