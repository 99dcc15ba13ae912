"""Service tests: a router (or one of its parts) in the test's own process, on real loopback sockets."""
