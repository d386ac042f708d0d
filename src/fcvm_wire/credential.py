"""The agent's credential: what proves, on every guest -> host connection, that the agent opened it.

Inside the guest, processes other than the agent may be able to reach the host's listeners (under Firecracker any
process that can create an AF_VSOCK socket can). So each VM has a random credential of CREDENTIAL_SIZE bytes,
made by the host. At a cold boot the host hands it to the agent over a host -> guest connection to
GUEST_CREDENTIAL, before any container exists; the agent keeps it in memory only (never in a file, the kernel
command line or MMDS, which the container can read) and sends it as the first bytes of every connection it opens
to the host. The host drops, unread, any connection that does not start with it. A snapshot keeps the agent's
memory, so its clones' host side uses the credential recorded with the snapshot.
"""

from __future__ import annotations

import socket

from fcvm_wire.sockets import read_exact

CREDENTIAL_SIZE = 32
CREDENTIAL_RECEIVED = b"\x06"  # the agent's answer on GUEST_CREDENTIAL once it holds the credential
# The agent sends its credential as soon as it is connected; a peer that has not within this time is not it.
CREDENTIAL_TIMEOUT = 5.0


class CredentialError(ValueError):
    pass


def from_hex(text: str) -> bytes:
    """A credential from its hex form (as the host records it), or CredentialError."""
    try:
        credential = bytes.fromhex(text)
    except ValueError:
        raise CredentialError("the agent credential is not hex") from None
    if len(credential) != CREDENTIAL_SIZE:
        raise CredentialError(f"the agent credential has {len(credential)} bytes, not {CREDENTIAL_SIZE}")
    return credential


def present(sock: socket.socket, credential: bytes) -> socket.socket:
    """Send the credential as the connection's first bytes (the agent's side); returns `sock`."""
    sock.sendall(credential)
    return sock


def receive(sock: socket.socket, timeout: float = CREDENTIAL_TIMEOUT) -> bytes:
    """The first CREDENTIAL_SIZE bytes of a connection, within `timeout`; the socket is left blocking.
    Raises OSError (TimeoutError, or ShortRead when the peer closes first)."""
    sock.settimeout(timeout)
    try:
        return read_exact(sock, CREDENTIAL_SIZE)
    finally:
        sock.settimeout(None)
