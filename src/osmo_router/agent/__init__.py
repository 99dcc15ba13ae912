"""The agent: runs inside the workload container, registers with the router, serves sessions."""
