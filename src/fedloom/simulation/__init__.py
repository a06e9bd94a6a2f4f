"""The simulation: every site of a plan on this machine (``fedloom simulate``,
``fedloom.simulate``), its worker processes or Ray actors, and the simulated attacks."""
