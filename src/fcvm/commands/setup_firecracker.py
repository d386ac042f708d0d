"""`fcvm setup firecracker`: install a Firecracker release (local tarball, or download) into the data dir."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fcvm.core.errors import UsageError
from fcvm.vmm.firecracker.release import DEFAULT_VERSION, download_and_install, install_tarball


def run(args: argparse.Namespace) -> int:
    if args.tarball:
        tarball = Path(args.tarball)
        if not tarball.is_file():
            raise UsageError(f"--tarball {tarball} does not exist")
        binary = install_tarball(tarball)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            binary = download_and_install(args.fc_version or DEFAULT_VERSION, Path(scratch))
    print(binary)
    return 0
