"""fcvm.fusepipe: the fuse-pipe host server (the FUSE protocol in Python, no libfuse).

`serve(dir, sock, read_only=...)` serves a host directory on a listening or connected stream socket; the
guest (or `fcvm fuse-pipe mount`) runs the relay in `fcvm_wire.fusepipe`.
"""

from fcvm.fusepipe.server import Server, serve

__all__ = ["Server", "serve"]
