"""Data directory, btrfs/reflink copies, per-VM disks, image disks."""
