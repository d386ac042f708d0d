"""fcvm.vmm."""
