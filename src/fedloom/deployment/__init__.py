"""The deployment: the aggregator server (``fedloom aggregator start``), a site's
collaborator process (``fedloom collaborator start``), resuming and stopping a run, and
the local launcher of a whole federation over gRPC."""
