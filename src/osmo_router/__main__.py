"""`python -m osmo_router` is `osmo-router`."""

from osmo_router.cli import main

main()
