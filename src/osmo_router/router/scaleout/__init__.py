"""Several replicas: the shared directory, peer channels and stream placement."""
