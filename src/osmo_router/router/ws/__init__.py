"""The old router's WebSocket endpoints as sides of the same pipeline."""
