"""Firecracker: typed API client (models, client), binary selection (binary), and the `FirecrackerVm` hypervisor
(vm). Nothing is re-exported here: choosing a hypervisor needs only `binary`, and must not import httpx."""
