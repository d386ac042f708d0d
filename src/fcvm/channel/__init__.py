"""Host side of the agent channel: Firecracker vsock Unix-socket semantics, also over QEMU virtio-serial.

- `connect_vsock(uds, port, timeout)`: host -> guest connection (works against Firecracker and the bridge).
- `SerialVsockBridge(serial_socket, uds_path)`: the QEMU side, `start()` / `close()`.
"""

from fcvm.channel.bridge import HOST_PORT_BASE, MAX_CONNECTIONS, SerialVsockBridge
from fcvm.channel.client import VsockConnectError, connect_vsock

__all__ = ["HOST_PORT_BASE", "MAX_CONNECTIONS", "SerialVsockBridge", "VsockConnectError", "connect_vsock"]
