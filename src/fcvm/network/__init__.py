"""VM networking: bridged (netns, veth, tap, iptables) and rootless (user namespace + slirp4netns/pasta)."""
