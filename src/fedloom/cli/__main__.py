"""``python -m fedloom.cli`` runs the command line."""

from fedloom.cli.main import main

main()
