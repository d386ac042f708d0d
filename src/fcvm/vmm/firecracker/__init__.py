"""Firecracker: typed API client (models, client), binary selection, and the `FirecrackerVm` hypervisor."""

from fcvm.vmm.firecracker.binary import (
    BinaryInfo,
    describe_binary,
    find_firecracker,
    firecracker_version,
    identify,
)
from fcvm.vmm.firecracker.client import (
    MOCK_HEADER,
    Client,
    FirecrackerApiError,
    FirecrackerConnectionError,
    FirecrackerError,
)
from fcvm.vmm.firecracker.vm import FirecrackerVm

__all__ = [
    "MOCK_HEADER",
    "BinaryInfo",
    "Client",
    "FirecrackerApiError",
    "FirecrackerConnectionError",
    "FirecrackerError",
    "FirecrackerVm",
    "describe_binary",
    "find_firecracker",
    "firecracker_version",
    "identify",
]
