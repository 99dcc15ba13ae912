"""End-to-end tests: real router, agent and client processes, real PTYs, rsync, Redis and TLS."""
