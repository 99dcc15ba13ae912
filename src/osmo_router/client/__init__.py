"""The user's side: `osmo-net-client` exec, port-forward and rsync."""
