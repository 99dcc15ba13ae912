"""The gRPC entry points: client and agent services and their stream sides."""
