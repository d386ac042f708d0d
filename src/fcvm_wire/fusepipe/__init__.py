"""fuse-pipe wire: frame format, FUSE structs and the guest-side client relay (standard library only).

API for the guest agent::

    from fcvm_wire.fusepipe import relay, start_relay, vsock_connect, RelayGiveUp

    # blocking: mounts MOUNTPOINT, relays until it is unmounted
    relay(vsock_connect(port), "/mnt/vol0", readers=2, read_only=False)

    # background: returns once the mount is live (raises if mounting failed)
    handle = start_relay(vsock_connect(port), "/mnt/vol0", readers=2, read_only=True)
    ...
    handle.unmount()   # umount (lazy + connection abort if busy), joins the relay thread

`connect` is any zero-argument callable returning a connected stream socket to the fuse-pipe server. It is
called again whenever the stream breaks (channel reset, snapshot restore); unanswered requests are re-sent
on the new stream, so the kernel mount never breaks. Raise `OSError` from `connect` to have it retried
(with backoff, up to 1 s between attempts) or `RelayGiveUp` to abort the mount.

Needs root (mount(2)) and /dev/fuse. See `proto` for the frame format.
"""

from fcvm_wire.fusepipe.client import (
    Relay,
    RelayGiveUp,
    RelayHandle,
    relay,
    start_relay,
    unix_connect,
    unmount,
    vsock_connect,
)

__all__ = [
    "Relay",
    "RelayGiveUp",
    "RelayHandle",
    "relay",
    "start_relay",
    "unix_connect",
    "unmount",
    "vsock_connect",
]
