"""The router: rendezvous of clients and agents, and the relay between them."""
