"""`python -m osmo_router` is `osmo-router`."""

from osmo_router.cli.main import main

main()
