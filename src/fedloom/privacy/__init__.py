"""What keeps the data owner in control: differential privacy with a budget, secure
aggregation, the site's policy, its audit log, and signatures on what the aggregator
publishes. Core modules here import neither torch nor grpc."""
