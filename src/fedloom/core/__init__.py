"""The bottom layer: the value types and helpers every other layer shares.

Nothing in ``fedloom.core`` imports from outside it (``tests/test_layers.py`` checks):
weights and tensor specs, the records of a round, errors, the clock and fault points,
seeded randomness, site names, the checks on what a site sends, atomic file writes.
"""
