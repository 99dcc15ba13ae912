"""osmo-router: a gRPC router for exec, port-forward and rsync into remote workload containers."""

import os as _os

#: Whether the environment chose gRPC core's log level itself (then it is left alone).
GRPC_VERBOSITY_GIVEN = "GRPC_VERBOSITY" in _os.environ
# gRPC core prints its own lines on stderr (a failed TLS handshake at INFO), which breaks the JSON
# log format. It reads this once, when grpc is imported, so it is set before any module of this
# package imports grpc. The client silences gRPC core entirely (see osmo_router.client).
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = "0.1.0"
