"""`fcvm setup uffd-preload`: build the QEMU preload library that hands guest RAM to the UFFD page server."""

from __future__ import annotations

import argparse

from fcvm.core import paths


def run(args: argparse.Namespace) -> int:
    from fcvm.uffd import preload

    print(preload.build(paths.ensure_dir(paths.assets_dir())))
    return 0
