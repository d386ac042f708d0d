"""Apply a containers seccomp profile (podman's JSON) the way podman and crun do, then exec a program under it.

`python3 tests/crun_seccomp.py PROFILE PROGRAM`: podman keeps the rules that apply to the container's
capabilities (podman's defaults) and architecture (amd64) and takes the architectures from the profile's archMap;
crun adds them to one libseccomp filter in order, skips rules whose action is the default one, and fails on any
rule libseccomp refuses (exit 125 here, as a container that cannot start). The same libseccomp (2.5) as the guest's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from pathlib import Path
from typing import Any

PODMAN_CAPS = {f"CAP_{name}" for name in ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE",
                                          "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT")}
_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6,
        "SCMP_CMP_MASKED_EQ": 7}
_ARCHES = {"SCMP_ARCH_X86": 0x40000003, "SCMP_ARCH_X32": 0x4000003E}
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000


class _Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def library_path() -> str | None:
    return ctypes.util.find_library("seccomp")


def _action(name: str, errno_ret: int) -> int:
    return {"SCMP_ACT_ALLOW": _ALLOW, "SCMP_ACT_ERRNO": _ERRNO | errno_ret}[name]


def _applies(rule: dict[str, Any]) -> bool:
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    return (set(includes.get("caps") or []) <= PODMAN_CAPS and not set(excludes.get("caps") or []) & PODMAN_CAPS
            and (not includes.get("arches") or "amd64" in includes["arches"])
            and "amd64" not in (excludes.get("arches") or []))


def main(profile_path: str, program: str) -> None:
    lib = ctypes.CDLL(library_path())
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    profile = json.loads(Path(profile_path).read_text())
    default = _action(profile["defaultAction"], profile.get("defaultErrnoRet", 1))
    ctx = lib.seccomp_init(default)
    for entry in profile["archMap"]:
        if entry["architecture"] == "SCMP_ARCH_X86_64":
            for sub in entry["subArchitectures"]:
                lib.seccomp_arch_add(ctx, _ARCHES[sub])
    for rule in profile["syscalls"]:
        action = _action(rule["action"], rule.get("errnoRet", 1))
        if not _applies(rule) or action == default:
            continue
        args = rule.get("args") or []
        cmps = (_Cmp * max(1, len(args)))(*[_Cmp(a["index"], _OPS[a["op"]], a["value"], a.get("valueTwo", 0))
                                            for a in args])
        for name in rule["names"]:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number == -10000:  # unknown to this libseccomp: crun warns and goes on
                continue
            if lib.seccomp_rule_add_array(ctx, action, number, len(args), cmps) < 0:
                sys.exit(125)
    if lib.seccomp_load(ctx) != 0:
        sys.exit(125)
    os.execv(program, [program])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
