"""Process and descriptor helpers shared by the agent and the client."""
