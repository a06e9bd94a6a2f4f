"""The ``fedloom`` command line (typer + rich). Thin: parse, call the library, map
errors to exit codes."""
