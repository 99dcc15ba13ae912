"""The wire protocol in one place: messages, frame bytes, operations, errors, the old WebSocket form."""
