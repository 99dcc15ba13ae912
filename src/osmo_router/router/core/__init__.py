"""The session pipeline: sides, rendezvous, relay and flow control, audit. No transport code."""
