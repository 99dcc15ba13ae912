"""Dialling the router: connection settings, their flags, channels, and what a failed dial means."""
