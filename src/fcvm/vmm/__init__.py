"""Hypervisors: QEMU microvm (qemu.py), Firecracker (firecracker/), and fc-mock (fc_mock/)."""
