"""The container's seccomp profile: podman's default, except that no AF_VSOCK socket can be created.

Only the agent may speak to the host over vsock (the channel's listeners check its credential too; this keeps the
container from even trying). The default profile allows `socket` for every family but one, so its socket rules
are replaced by an allow-list of families:

- seccomp sees all 64 bits of an argument while the kernel reads `int family` from the low 32, so a deny rule
  for 40 would let 0x1_0000_0028 through; every allowed range is matched on all 64 bits instead (MASKED_EQ with
  a full mask), and everything else falls to the profile's default action;
- where rules with different actions overlap, libseccomp's decision tree picks one by the order it tests the
  arguments, not by which rule is narrower (a deny for 40 beside podman's allow for "protocol != 9" loses), and
  crun refuses to start a container when two rules conflict outright; so the rules never overlap;
- 32-bit x86 code (which any process can run, through `int 0x80`) can create sockets with
  `socketcall(SYS_SOCKET, args)`, whose family sits in memory where seccomp cannot read it, and libseccomp turns
  every x86 `socket` rule into a `socketcall` rule that ignores the family. So the profile leaves out the x86
  sub-architecture: a 32-bit system call kills the process, as on a kernel booted with `ia32_emulation=0`.
  64-bit (and x32) programs are unaffected.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

DEFAULT_PROFILE = Path("/usr/share/containers/seccomp.json")
PROFILE = Path("/run/fcvm/seccomp.json")
AF_NETLINK = 16
AF_VSOCK = 40
NETLINK_AUDIT = 9
_FAMILY_LIMIT = 64  # above every address family Linux has (AF_MAX is 46 in 6.1)
_FULL = (1 << 64) - 1
_AUDIT_CAP = {"caps": ["CAP_AUDIT_WRITE"]}
_X86_64 = "SCMP_ARCH_X86_64"
_X86 = "SCMP_ARCH_X86"


def _blocks(low: int, high: int) -> list[tuple[int, int]]:
    """[low, high) as aligned power-of-two blocks: (mask, value) pairs for MASKED_EQ."""
    blocks = []
    while low < high:
        size = low & -low if low else 1 << (high.bit_length() - 1)
        while low + size > high:
            size //= 2
        blocks.append((_FULL & ~(size - 1), low))
        low += size
    return blocks


def _rule(names: list[str], action: str, args: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"names": names, "action": action, "args": args, **extra}


def _arg(index: int, op: str, value: int, value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def _socket_rules() -> list[dict[str, Any]]:
    allowed = [(0, AF_NETLINK), (AF_NETLINK + 1, AF_VSOCK), (AF_VSOCK + 1, _FAMILY_LIMIT)]
    rules = [_rule(["socket"], "SCMP_ACT_ALLOW", [_arg(0, "SCMP_CMP_MASKED_EQ", mask, value)])
             for low, high in allowed for mask, value in _blocks(low, high)]
    netlink = _arg(0, "SCMP_CMP_EQ", AF_NETLINK)
    rules += [
        # podman's own rule for netlink: the audit protocol only with CAP_AUDIT_WRITE.
        _rule(["socket"], "SCMP_ACT_ALLOW", [netlink, _arg(2, "SCMP_CMP_NE", NETLINK_AUDIT)], excludes=_AUDIT_CAP),
        _rule(["socket"], "SCMP_ACT_ERRNO", [netlink, _arg(2, "SCMP_CMP_EQ", NETLINK_AUDIT)], excludes=_AUDIT_CAP,
              errnoRet=errno.EINVAL),
        _rule(["socket"], "SCMP_ACT_ALLOW", [netlink], includes=_AUDIT_CAP),
        _rule(["socket"], "SCMP_ACT_ERRNO", [_arg(0, "SCMP_CMP_EQ", AF_VSOCK)], errnoRet=errno.EPERM),
    ]
    return rules


def derive(default: dict[str, Any]) -> dict[str, Any]:
    """`default` (podman's profile) with its socket rules replaced by those above, without 32-bit x86."""
    syscalls = []
    for rule in default["syscalls"]:
        names = [name for name in rule["names"] if name != "socket"]
        if names:
            syscalls.append({**rule, "names": names})
    arch_map = [{**entry, "subArchitectures": [sub for sub in entry["subArchitectures"] if sub != _X86]}
                if entry["architecture"] == _X86_64 else entry for entry in default.get("archMap", [])]
    return {**default, "archMap": arch_map, "syscalls": syscalls + _socket_rules()}


def write_profile(default: Path = DEFAULT_PROFILE, target: Path = PROFILE) -> Path:
    """Derive the container's profile from podman's default and write it where `podman run` reads it."""
    profile = derive(json.loads(default.read_text()))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(profile, indent=1))
    return target
