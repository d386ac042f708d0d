"""fc-mock: Firecracker's REST API (validated against the official spec) booting guests with QEMU.

Its own executable, `fcvm-fc-mock` (main.py). It identifies itself honestly: every API response
carries `X-Fcvm-Mock: 1` and `--version` ends with "(fc-mock)".
"""
