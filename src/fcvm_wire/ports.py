"""Agent-channel port numbers. The channel has Firecracker vsock semantics on both hypervisors:
host->guest connects to the vsock UDS and sends `CONNECT <port>`; guest->host connects to CID 2 and the
host accepts on `<uds>_<port>`."""

# guest -> host: the agent's control stream (plan under QEMU, status events, agent and container output).
HOST_CONTROL = 1000
# host -> guest: the agent's credential, once, at a cold boot (a privileged vsock port: binding needs
# CAP_NET_BIND_SERVICE). Every guest -> host connection starts with it (fcvm_wire.credential).
GUEST_CREDENTIAL = 1023
# host -> guest: exec requests, one connection per exec.
GUEST_EXEC = 1024
# guest -> host: fuse-pipe volumes, one port per --map, in order.
HOST_VOLUME_BASE = 5000
# Guest CID given to every VM; clones keep it (the vsock UDS path is what differs).
GUEST_CID = 3
HOST_CID = 2
