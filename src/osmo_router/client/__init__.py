"""The user's side: `osmo-net-client` exec, port-forward and rsync."""

import os as _os

from osmo_router import GRPC_VERBOSITY_GIVEN as _GIVEN

# The CLI prints one clear line per failure; gRPC core's own lines (handshake errors) would only
# repeat it in raw form. Set before grpc is imported by any client module.
if not _GIVEN:
    _os.environ["GRPC_VERBOSITY"] = "NONE"
