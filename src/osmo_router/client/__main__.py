"""`python -m osmo_router.client`: the same as `osmo-net-client` (used as rsync's remote shell)."""

from osmo_router.client.cli import main

main()
