"""fedloom's version, one place for the package, the command line and the workers."""

__version__ = "0.1.0"
