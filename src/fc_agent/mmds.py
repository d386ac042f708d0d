"""MMDS V2 client: the plan under Firecracker."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

MMDS_ADDRESS = "169.254.169.254"


def fetch(path: str = "/", *, timeout: float = 30.0) -> bytes:
    """PUT a session token, then GET `path` as JSON (the document's bytes, for the caller's own decoder); retries
    until the metadata service answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            token_request = urllib.request.Request(
                f"http://{MMDS_ADDRESS}/latest/api/token", method="PUT",
                headers={"X-metadata-token-ttl-seconds": "21600"},
            )
            with urllib.request.urlopen(token_request, timeout=2) as response:
                token = response.read().decode()
            request = urllib.request.Request(
                f"http://{MMDS_ADDRESS}{path}",
                headers={"X-metadata-token": token, "Accept": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.read()
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
