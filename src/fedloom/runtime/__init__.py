"""Runtimes wire the layers together: the simulation runtime (here), and later the
aggregator server and the collaborator client of a real federation."""
