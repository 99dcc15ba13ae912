"""An asyncio HTTP/2 transport for gRPC (issue 18): frames, connections and streams, the gRPC layer, a server.

`connection.py` documents the API the client and server roles share.
"""
