"""The osmo-router command and the helpers both command lines share."""
