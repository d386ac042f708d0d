"""Stand-ins for programs fcvm drives but cannot run here: fc-mock (a `firecracker`), the stand-in jailer,
the UFFD client harness and the QEMU loopback channel. They may import fcvm; fcvm never imports them."""
