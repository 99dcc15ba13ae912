"""osmo-router: a gRPC router for exec, port-forward and rsync into remote workload containers."""

__version__ = "0.1.0"
