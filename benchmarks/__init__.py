"""Load generator and benchmark harness for nanomsg (and any server speaking its protocol).

``python -m benchmarks <scenario> [options]`` drives the /chat WebSocket protocol and the HTTP
side-port of a server at a given URL, signing tokens with a given HS256 key, so the same
harness can measure nanomsg and other implementations of protocol.md. See
``benchmarks/README.md`` for the scenarios, the exact commands and the caveats.

The package lives outside ``nanomsg/`` and outside ``tests/`` on purpose: it is a measuring
instrument, not part of the server, and pytest (``testpaths = ["tests"]``) never collects it.
"""
