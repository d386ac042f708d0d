"""Snapshots of running VMs and the machine description a clone is rebuilt from."""
