"""`fcvm setup demo-image`: build localhost/fcvm-busybox and localhost/fcvm-demo-httpd with podman import."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from fcvm.guest.images import DEMO_IMAGES, build_demo_images

    build_demo_images(progress=False)
    for image in DEMO_IMAGES:
        print(image.name)
    return 0
