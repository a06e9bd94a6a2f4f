"""``python -m fedloom`` runs the command line, as ``fedloom`` does."""

from fedloom.cli.main import main

main()
