#!/usr/bin/env bash
# Prepares a Debian bookworm host (as root) for fcvm: packages, the Python package, guest assets,
# demo images. Idempotent; guest assets are content-addressed, so a warm run rebuilds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup-host.sh must run as root (it installs packages and builds guest assets)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
packages=(qemu-system-x86 podman runc mmdebstrap btrfs-progs iptables slirp4netns passt kmod
          busybox-static e2fsprogs uidmap cpio curl zstd fuse3 iproute2 gcc python3-dev python3-venv)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi

python3 -m pip install -q -e '.[dev]'

fcvm setup storage
fcvm setup kernel
fcvm setup rootfs
fcvm setup demo-image
fcvm setup uffd-preload
fcvm doctor || true
