"""nanomsg: a self-hosted real-time chat server.

WebSocket rooms, JWT auth, SQL storage, Redis relay.
"""

__version__ = "0.1.0"
