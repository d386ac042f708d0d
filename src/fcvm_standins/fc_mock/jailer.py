"""`fcvm-jailer-mock`: a stand-in for Firecracker's `jailer` (v1.16), to jail fc-mock where no jailer exists.

Same command line, same steps in the same order, with the same kernel features (run it as root):
validate the arguments (the exec-file's name must contain "firecracker", the chroot base must exist);
close inherited file descriptors; with `--cgroup-version 2` and no `--cgroup`, join
`<cgroup2 mount>/<parent-cgroup>` if it exists (the jailer's "move to the parent" rule); create
`<chroot-base>/<exec name>/<id>/root` and copy the exec-file into it; join `--netns`; set the resource
limits (`no-file` is 2048 unless given); create `<mount>/<parent-cgroup>/<id>` for each `--cgroup`
(v1: per controller, values inherited from the parent first; v2: controllers enabled in the parents'
cgroup.subtree_control), write the values, then join them; unshare a mount namespace, make every mount a
slave, bind the jail root on itself and pivot_root into it; create /, /dev, /dev/net, /run (0700, owned by
uid:gid), /dev/net/tun, /dev/kvm, /dev/urandom, /dev/userfaultfd (0600, owned by uid:gid); write
`/<exec name>.pid`; drop to uid:gid with no supplementary groups and exec
`/<exec name> --id ID --start-time-us T --start-time-cpu-us T --parent-cpu-time-us T <args after -->`
in this same process, stdio inherited. Like the jailer, it never removes what it created.

How it differs from the real jailer. fc-mock is a Python program that launches QEMU, not a static binary
with no children, so the stand-in also:
- bind-mounts read-only, at their own paths, before pivot_root: /usr, /etc, the interpreter's prefixes and
  sys.path entries outside /usr, the directory holding the `fcvm` package, and the directory of the
  Firecracker API spec fc-mock validates against (passed as FCVM_FC_SPEC); and recreates the merged-/usr
  links (bin, sbin, lib, lib64 -> usr/...), or bind-mounts them where they are real directories;
- creates /dev/null and /dev/zero (mode 0666) and mounts a fresh proc (hidepid=2) on /proc and a tmpfs on
  /tmp and on /dev/shm;
- keeps CAP_NET_ADMIN and CAP_NET_BIND_SERVICE (permitted, effective, inheritable and ambient) across the
  uid drop, for fc-mock's host-side MMDS (see caps.py; fc-mock clears the ambient set so QEMU gets none);
- gives the exec'd program the FCVM_* and PYTHONPATH variables of its environment (FCVM_FC_SPEC set to
  the spec found) instead of an empty environment;
- creates /dev/kvm only when the host has it;
- refuses --daemonize and --new-pid-ns (fcvm uses neither), --cgroup-version other than 1 or 2, and a
  --resource-limit above the current hard limit (raising one needs CAP_SYS_RESOURCE); it checks all of
  this before creating anything;
- reports errors as `jailer: error: <message>` with exit code 1 (the jailer panics, exit code 101).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import filecmp
import importlib.util
import os
import re
import resource
import signal
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fcvm_standins.fc_mock import caps
from fcvm_standins.fc_mock.spec import SPEC_NAME, SpecNotFoundError, find_spec

DEFAULT_CHROOT_BASE = "/srv/jailer"
DEFAULT_NO_FILE = 2048  # the jailer's default RLIMIT_NOFILE
MAX_ID_LEN = 64
_RLIMITS = {"fsize": resource.RLIMIT_FSIZE, "no-file": resource.RLIMIT_NOFILE}
_JAIL_DIRS = ("/", "/dev", "/dev/net", "/run")  # created, chmod 0700 and chowned to uid:gid, as the jailer does
_USR_LINKS = ("bin", "sbin", "lib", "lib64")

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SLAVE = 0x80000
_MNT_DETACH = 0x2
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class JailerError(Exception):
    pass


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _libc_call(name: str, *args: object) -> None:
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mount(source: str | None, target: str | Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    def c(value: str | Path | None) -> bytes | None:
        return None if value is None else os.fsencode(value)

    _libc_call("mount", c(source), c(target), c(fstype), ctypes.c_ulong(flags), c(data))


def _make_readonly(path: Path) -> None:
    """Read-only for the mount at `path` and every mount below it (a recursive bind brings submounts)."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    ret = _libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), os.fsencode(path),
                        ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    err = ctypes.get_errno()
    if ret == 0:
        return
    if err != errno.ENOSYS:
        raise OSError(err, os.strerror(err))
    _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)  # before 5.12: the top mount only


def _setns(fd: int, nstype: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, nstype)
    else:
        _libc_call("setns", ctypes.c_int(fd), ctypes.c_int(nstype))


def _unshare(flags: int) -> None:
    unshare = getattr(os, "unshare", None)  # Python 3.12+
    if unshare is not None:
        unshare(flags)
    else:
        _libc_call("unshare", ctypes.c_int(flags))


def _writeln(path: Path, value: object) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        raise JailerError(f"Failed to write to {path}: {exc.strerror}") from None


def _readln(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as exc:
        raise JailerError(f"Failed to read file {path} into a string: {exc.strerror}") from None
    return text[:-1] if text.endswith("\n") else text


# --- cgroups --------------------------------------------------------------------------------------------


def _cgroup_mounts() -> list[tuple[str, Path, set[str]]]:
    """(fstype, mount point, super options) of each cgroup and cgroup2 mount, in mount order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fstype, _source, options = [*after.split(" "), "", ""][:3]
        if fstype in ("cgroup", "cgroup2"):
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), before.split(" ")[4])
            found.append((fstype, Path(point), set(options.split(","))))
    return found


def _v2_mount() -> Path:
    for fstype, point, _ in _cgroup_mounts():
        if fstype == "cgroup2":
            return point
    raise JailerError("Hierarchy not found: cgroupsv2 hierarchy missing (no cgroup2 mount in /proc/self/mountinfo)")


def _controller(file: str) -> str:
    parts = file.split(".")
    if len(parts) < 2:
        raise JailerError(f"Cgroup invalid file: {file} (expected <controller>.<property>)")
    return parts[0]


@dataclass
class Cgroup:
    """One cgroup the jailer creates: v1, one per controller; v2, one in the unified hierarchy."""

    version: int
    location: Path  # <mount>/<parent cgroup>/<id>
    parent_depth: int  # components of the parent cgroup: how far up v1 values may be inherited from
    properties: list[tuple[str, str]] = field(default_factory=list)

    def write_values(self) -> None:
        try:
            self.location.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JailerError(f"Failed to create directory {self.location}: {exc.strerror}") from None
        enabled: set[str] = set()
        for file, value in self.properties:
            if self.version == 1:
                # A new v1 cgroup's files can start empty (cpuset.cpus/mems), and a value cannot be written
                # under an empty parent: the jailer copies the parent's value down first.
                _inherit_from_parent(self.location, file, self.parent_depth)
            elif (controller := _controller(file)) not in enabled:
                _enable_controller(self.location.parent, controller)
                enabled.add(controller)
            _writeln(self.location / file, value)

    def attach_pid(self) -> None:
        _writeln(self.location / ("cgroup.procs" if self.version == 2 else "tasks"), os.getpid())


def _inherit_from_parent(path: Path, file: str, depth: int) -> None:
    parent_file = path.parent / file
    line = _readln(parent_file)
    if not line and depth > 0:
        # Another jailer may fill the parent concurrently: only the re-read below decides.
        with contextlib.suppress(JailerError):
            _inherit_from_parent(path.parent, file, depth - 1)
        line = _readln(parent_file)
    if not line:
        raise JailerError(f"Failed to inherit cgroups configurations from file {file} in path {path}")
    _writeln(path / file, line)


def _enable_controller(path: Path, controller: str) -> None:
    """cgroup v2: a controller's files appear in a cgroup only if every ancestor enables it for its children."""
    control = path / "cgroup.subtree_control"
    if not control.exists():  # above the mount point
        return
    if path.parent != path:
        _enable_controller(path.parent, controller)
    _writeln(control, f"+{controller}")


def _build_cgroups(version: int, specs: list[str], jail_id: str, parent: Path) -> list[Cgroup]:
    mounts = _cgroup_mounts()
    wanted = "cgroup2" if version == 2 else "cgroup"
    if not any(fstype == wanted for fstype, _, _ in mounts):
        raise JailerError(f"Hierarchy not found: no {wanted} mount in /proc/self/mountinfo")
    groups: dict[str, Cgroup] = {}
    for spec in specs:
        parts = spec.split("=")
        if len(parts) != 2 or not parts[1]:
            raise JailerError(f"Invalid format for cgroups: {spec} (expected <file>=<value>)")
        file, value = parts
        if file.startswith("/") or any(p in (".", "..") for p in file.split("/")):
            raise JailerError(f"Cgroup invalid file: {spec}")
        controller = _controller(file)
        if version == 2:
            mount = _v2_mount()
            available = set((mount / "cgroup.controllers").read_text().split())
            if controller not in available:
                raise JailerError(
                    f"Controller {controller} is unavailable: {mount}/cgroup.controllers lists "
                    f"{' '.join(sorted(available)) or 'none'} (a controller bound to a cgroup v1 hierarchy "
                    "cannot be used in v2)")
            key = "unified"
        else:
            v1_mount = next((p for fs, p, opts in mounts if fs == "cgroup" and controller in opts), None)
            if v1_mount is None:
                raise JailerError(f"Controller {controller} is unavailable: no cgroup v1 hierarchy has it mounted")
            mount, key = v1_mount, controller
        group = groups.setdefault(key, Cgroup(version, mount / parent / jail_id, len(parent.parts)))
        group.properties.append((file, value))
    return list(groups.values())


# --- arguments ------------------------------------------------------------------------------------------


@dataclass
class Jail:
    id: str
    exec_file: Path
    chroot_dir: Path
    uid: int
    gid: int
    netns: str | None
    cgroups: list[Cgroup]
    rlimits: dict[int, int]
    extra_args: list[str]
    env: dict[str, str]
    spec: Path | None
    start_us: int
    start_cpu_us: int
    has_kvm: bool
    uffd_minor: int | None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fcvm-jailer-mock", description=(__doc__ or "").splitlines()[0],
        epilog="Any arguments after the -- separator are supplied to the jailed binary.")
    p.add_argument("--id", required=True, help="jail ID: letters, digits and '-', 1 to 64 characters")
    p.add_argument("--exec-file", required=True, help="file to copy into the jail and exec into")
    p.add_argument("--uid", required=True, help="the uid the jailed binary runs as")
    p.add_argument("--gid", required=True, help="the gid the jailed binary runs as")
    p.add_argument("--chroot-base-dir", default=DEFAULT_CHROOT_BASE, help="where jails are built")
    p.add_argument("--netns", help="path of a network namespace to join")
    p.add_argument("--cgroup-version", default="1", help="1 (default) or 2")
    p.add_argument("--parent-cgroup", help="cgroup path, relative to the hierarchy, holding <id> (default: the "
                                           "exec-file's name)")
    p.add_argument("--cgroup", action="append", default=[], metavar="FILE=VALUE", help="repeatable")
    p.add_argument("--resource-limit", action="append", default=[], metavar="RES=VALUE",
                   help="fsize=BYTES or no-file=N (default no-file=2048); repeatable")
    p.add_argument("--daemonize", action="store_true", help="not supported by the stand-in")
    p.add_argument("--new-pid-ns", action="store_true", help="not supported by the stand-in")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def _validate_id(jail_id: str) -> None:
    if not 1 <= len(jail_id) <= MAX_ID_LEN:
        raise JailerError(f"Invalid instance ID: invalid length ({len(jail_id)}): the length must be between "
                          f"1 and {MAX_ID_LEN}")
    for position, char in enumerate(jail_id):
        if not (char.isascii() and (char.isalnum() or char == "-")):
            raise JailerError(f"Invalid instance ID: invalid char ({char}) at position {position}: "
                              "only A-Z, a-z, 0-9 and '-' are allowed")


def _id_number(kind: str, text: str) -> int:
    if not text.isdigit() or int(text) >= 2**32:
        raise JailerError(f"Invalid {kind}: {text}")
    return int(text)


def _resolve(text: str, what: str) -> Path:
    try:
        return Path(text).resolve(strict=True)
    except OSError as exc:
        raise JailerError(f"Failed to canonicalize path {text}: {exc.strerror} ({what} must exist)") from None


def _parse_rlimits(specs: list[str]) -> dict[int, int]:
    limits = {resource.RLIMIT_NOFILE: DEFAULT_NO_FILE}
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep:
            raise JailerError(f"Invalid format for resources limits: {spec} (expected <resource>=<value>)")
        if not text.isdigit() or int(text) >= 2**64:
            raise JailerError(f"Invalid limit value for resource: {text}: not an unsigned 64-bit integer")
        if name not in _RLIMITS:
            raise JailerError(f"Invalid resource argument: {name} (the jailer knows {', '.join(_RLIMITS)})")
        limits[_RLIMITS[name]] = int(text)
    for name, which in _RLIMITS.items():
        hard = resource.getrlimit(which)[1]
        if which in limits and hard != resource.RLIM_INFINITY and limits[which] > hard:
            raise JailerError(f"Failed to set limit for resource: {name}={limits[which]} is above the current hard "
                              f"limit {hard} (raising a hard limit needs CAP_SYS_RESOURCE; the stand-in never tries"
                              f"{'; no-file defaults to 2048' if name == 'no-file' else ''})")
    return limits


def _uffd_minor() -> int | None:
    """/dev/userfaultfd is a misc device with a minor allocated at boot: the jailer looks it up in /proc/misc."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/misc").read_text().splitlines():
            minor, _, name = line.strip().partition(" ")
            if name == "userfaultfd":
                return int(minor)
    return None


def _exec_env() -> tuple[dict[str, str], Path | None]:
    """The jailer hands Firecracker an empty environment; fc-mock is configured through FCVM_* variables and,
    when fcvm is not installed, imported through PYTHONPATH, so those pass (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("FCVM_") or k == "PYTHONPATH"}
    try:
        spec: Path | None = find_spec().resolve()  # before the chroot: it searches host paths and the cwd
    except SpecNotFoundError:
        spec = None  # fc-mock reports it; a test's exec-file may not need it
    if spec is not None:
        env["FCVM_FC_SPEC"] = str(spec)
    return env, spec


def validate(args: argparse.Namespace, extra: list[str], start_us: int, start_cpu_us: int) -> Jail:
    """Everything the jailer checks before creating anything (its Env::new), in its order."""
    if args.daemonize:
        raise JailerError("--daemonize is not supported by the jailer stand-in (fcvm does not use it)")
    if args.new_pid_ns:
        raise JailerError("--new-pid-ns is not supported by the jailer stand-in (fcvm does not use it)")
    _validate_id(args.id)
    exec_file = _resolve(args.exec_file, "--exec-file")
    if not exec_file.is_file():
        raise JailerError(f"{exec_file} is not a file")
    if "firecracker" not in exec_file.name:
        raise JailerError(f'Invalid filename. The filename of `--exec-file` option must contain "firecracker": '
                          f"{exec_file.name}")
    base = _resolve(args.chroot_base_dir, "--chroot-base-dir")
    if not base.is_dir():
        raise JailerError(f"{base} is not a directory")
    uid = _id_number("uid", args.uid)
    gid = _id_number("gid", args.gid)
    parent = Path(args.parent_cgroup or exec_file.name)
    if parent.is_absolute() or any(p in (".", "..") for p in (args.parent_cgroup or "").split("/")):
        raise JailerError("Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'")
    if args.cgroup_version not in ("1", "2"):
        raise JailerError(f"{args.cgroup_version} is an invalid cgroup version specifier (use 1 or 2)")
    version = int(args.cgroup_version)
    if version == 2 and not args.cgroup:
        # The jailer's rule: with no --cgroup, "the intent is to move the process to" the parent cgroup, if
        # it exists; no <parent>/<id> is created.
        existing = _v2_mount() / parent
        if existing.is_dir():
            _writeln(existing / "cgroup.procs", os.getpid())
    cgroups = _build_cgroups(version, args.cgroup, args.id, parent) if args.cgroup else []
    rlimits = _parse_rlimits(args.resource_limit)
    env, spec = _exec_env()
    return Jail(id=args.id, exec_file=exec_file, chroot_dir=base / exec_file.name / args.id / "root", uid=uid,
                gid=gid, netns=args.netns, cgroups=cgroups, rlimits=rlimits, extra_args=extra, env=env, spec=spec,
                start_us=start_us, start_cpu_us=start_cpu_us, has_kvm=Path("/dev/kvm").exists(),
                uffd_minor=_uffd_minor())


# --- the jail -------------------------------------------------------------------------------------------


def _copy_exec(jail: Jail) -> Path:
    target = jail.chroot_dir / jail.exec_file.name
    try:
        # An identical file is kept: it may be a hard link to the exec-file itself, and copying over it
        # would truncate the original.
        if not (target.is_file() and filecmp.cmp(jail.exec_file, target, shallow=False)):
            partial = target.with_name(f".{target.name}.partial")
            partial.write_bytes(jail.exec_file.read_bytes())
            partial.replace(target)
        target.chmod(0o755)
    except OSError as exc:
        raise JailerError(f"Failed to copy {jail.exec_file} to {target}: {exc.strerror}") from None
    return Path("/") / jail.exec_file.name


def _join_netns(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise JailerError(f"Failed to open file {path}: {exc.strerror} (--netns)") from None
    try:
        _setns(fd, _CLONE_NEWNET)
    except OSError as exc:
        raise JailerError(f"Failed to join network namespace: netns: {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _install_rlimits(limits: dict[int, int]) -> None:
    names = {which: name for name, which in _RLIMITS.items()}
    for which, limit in limits.items():
        try:
            resource.setrlimit(which, (limit, limit))  # soft = hard, as the jailer
        except (OSError, ValueError) as exc:
            raise JailerError(f"Failed to set limit for resource: {names[which]}={limit}: {exc}") from None


def _runtime_paths(jail: Jail) -> tuple[list[Path], dict[str, str]]:
    """What fc-mock (Python, then QEMU) needs from the host: paths to bind at the same place, and links."""
    wanted = [Path("/usr"), Path("/etc")]
    # sys.path[0] is where the jailer was started from (its script's directory, or the cwd): not fc-mock's.
    for entry in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *sys.path[1:]):
        if entry and os.path.isabs(entry):
            wanted.append(Path(os.path.realpath(entry)))
    package = importlib.util.find_spec("fcvm")
    for location in (package.submodule_search_locations or []) if package else []:
        wanted.append(Path(os.path.realpath(location)).parent)  # src/, which also holds fcvm_wire
    if jail.spec is not None:
        wanted.append(jail.spec.parent)
    links = {}
    for name in _USR_LINKS:
        host = Path("/") / name
        if host.is_symlink():
            links[name] = os.readlink(host)
        elif host.is_dir():
            wanted.append(host)
    chosen: list[Path] = []
    for path in sorted({p for p in wanted if p.exists()}):  # a parent sorts before its children
        inside_chosen = any(path == c or c in path.parents for c in chosen)
        # Binding / or an ancestor of the jail would put the jail, and more, inside itself.
        if not inside_chosen and path != Path("/") and path not in jail.chroot_dir.parents:
            chosen.append(path)
    return chosen, links


def _bind_runtime(root: Path, binds: list[Path], links: dict[str, str]) -> None:
    for name, link_target in links.items():
        link = root / name
        if not link.is_symlink() and not link.exists():
            link.symlink_to(link_target)
    for source in binds:
        target = root / source.relative_to("/")
        try:
            if source.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch(exist_ok=True)
            _mount(str(source), target, None, _MS_BIND | _MS_REC)
            _make_readonly(target)
        except OSError as exc:
            raise JailerError(f"Failed to bind-mount {source} read-only into the jail: {exc.strerror}") from None


def _chroot(root: Path, binds: list[Path], links: dict[str, str]) -> None:
    """The jailer's chroot(): a private mount namespace, pivot_root into the jail, the old root detached."""
    steps: list[tuple[str, Callable[[], None]]] = [
        ("Failed to unshare into new mount namespace", lambda: _unshare(_CLONE_NEWNS)),
        # Slave, as the jailer: nothing mounted from here on propagates back to the host.
        ("Failed to change the propagation type to slave", lambda: _mount(None, "/", None, _MS_SLAVE | _MS_REC)),
        # pivot_root needs the new root to be a mount point.
        ("Failed to bind mount the jail root directory", lambda: _mount(str(root), root, None, _MS_BIND | _MS_REC)),
        ("Failed to prepare the runtime bind mounts", lambda: _bind_runtime(root, binds, links)),
        ("Failed to change current directory", lambda: os.chdir(root)),
        ("Failed to create the jail root directory before pivoting root", lambda: os.mkdir("old_root", 0o600)),
        ("Failed to pivot root", lambda: _libc_call("pivot_root", b".", b"old_root")),
        ("Failed to chdir into chroot directory", lambda: os.chdir("/")),
        ("Failed to unmount the old jail root", lambda: _libc_call("umount2", b"old_root", ctypes.c_int(_MNT_DETACH))),
        ("Failed to remove old jail root directory", lambda: os.rmdir("old_root")),
    ]
    for message, step in steps:
        try:
            step()
        except OSError as exc:
            raise JailerError(f"{message}: {exc.strerror}") from None


def _mknod(path: str, major: int, minor: int, mode: int, owner: tuple[int, int] | None) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(path, mode)  # mknod's mode goes through the umask
        if owner is not None:
            os.chown(path, *owner)
    except OSError as exc:
        raise JailerError(f"Failed to create {path} via mknod inside the jail: {exc.strerror}") from None


def _setup_inside(jail: Jail, exec_path: Path) -> None:
    """After pivot_root, still root: the jailer's folders and devices, then the stand-in's runtime needs."""
    owner = (jail.uid, jail.gid)
    for folder in _JAIL_DIRS:
        try:
            os.makedirs(folder, exist_ok=True)
            os.chmod(folder, 0o700)
            os.chown(folder, *owner)
        except OSError as exc:
            raise JailerError(f"Failed to set up jail folder {folder}: {exc.strerror}") from None
    _mknod("/dev/net/tun", 10, 200, 0o600, owner)
    if jail.has_kvm:
        _mknod("/dev/kvm", 10, 232, 0o600, owner)
    try:
        _mknod("/dev/urandom", 1, 9, 0o600, owner)
    except JailerError as exc:  # the jailer only warns, on stdout
        print(f"Warning! Could not create /dev/urandom device inside jailer: {exc}.\n"
              "MMDS version 2 will not be available to use.", flush=True)
    if jail.uffd_minor is not None:
        _mknod("/dev/userfaultfd", 10, jail.uffd_minor, 0o600, owner)
    # Stand-in only: what Python and QEMU need and a static Firecracker does not.
    for name, minor in (("/dev/null", 3), ("/dev/zero", 5)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        _mknod(name, 1, minor, 0o666, None)
    for point, fstype, flags, data in (("/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=2"),
                                       ("/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777"),
                                       ("/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777")):
        try:
            os.makedirs(point, exist_ok=True)
            _mount(fstype, point, fstype, flags, data)
        except OSError as exc:
            raise JailerError(f"Failed to mount {fstype} on {point} inside the jail: {exc.strerror}") from None
    pid_file = exec_path.with_name(exec_path.name + ".pid")
    try:
        with open(pid_file, "x") as f:  # create_new, as the jailer: an existing one is an error
            f.write(str(os.getpid()))
    except OSError as exc:
        raise JailerError(f"Failed to open file {pid_file}: {exc.strerror}") from None


def _drop_privileges(uid: int, gid: int) -> None:
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        caps.set_keepcaps(True)  # keep the permitted set through setresuid, to pick the two MMDS caps from
        os.setresuid(uid, uid, uid)
        caps.keep_only(caps.MMDS_CAPS)
    except OSError as exc:
        raise JailerError(f"Failed to drop privileges to {uid}:{gid}: {exc.strerror}") from None


def run(jail: Jail) -> None:
    """The jailer's Env::run: returns only by raising JailerError; on success the process is the exec-file."""
    # The chroot and the directories made inside it for the runtime binds must be traversable by the jailed uid,
    # whatever umask the caller runs under (077 would lock it out of its own root, and the interpreter's path).
    os.umask(0o022)
    try:
        jail.chroot_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JailerError(f"Failed to create directory {jail.chroot_dir}: {exc.strerror}") from None
    exec_path = _copy_exec(jail)
    if jail.netns:
        _join_netns(jail.netns)
    _install_rlimits(jail.rlimits)
    # Values first, then the pid: some cgroups need others set before a process may join (cpuset).
    for cgroup in jail.cgroups:
        cgroup.write_values()
    for cgroup in jail.cgroups:
        cgroup.attach_pid()
    binds, links = _runtime_paths(jail)
    _chroot(jail.chroot_dir, binds, links)
    _setup_inside(jail, exec_path)
    jailer_cpu_us = time.process_time_ns() // 1000 - jail.start_cpu_us
    _drop_privileges(jail.uid, jail.gid)
    argv = [str(exec_path), "--id", jail.id, "--start-time-us", str(jail.start_us),
            "--start-time-cpu-us", str(time.process_time_ns() // 1000),
            "--parent-cpu-time-us", str(jailer_cpu_us), *jail.extra_args]
    # Python ignores SIGPIPE and SIGXFSZ and execve keeps ignored signals ignored; Firecracker starts with
    # the defaults (and --resource-limit fsize is meant to deliver SIGXFSZ).
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(exec_path, argv, jail.env)
    except OSError as exc:
        raise JailerError(f"Failed to exec into Firecracker: {exec_path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    start_us = time.monotonic_ns() // 1000  # CLOCK_MONOTONIC, as the jailer's --start-time-us
    start_cpu_us = time.process_time_ns() // 1000  # CLOCK_PROCESS_CPUTIME_ID
    # The jailer's first step: no inherited descriptor but stdio reaches the jail.
    for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")):
        if fd > 2:
            with contextlib.suppress(OSError):  # the directory's own descriptor is already closed
                os.close(fd)
    raw = list(sys.argv[1:] if argv is None else argv)
    own, extra = (raw[: raw.index("--")], raw[raw.index("--") + 1 :]) if "--" in raw else (raw, [])
    if "--version" in own:
        print(f"Jailer v{SPEC_NAME.removeprefix('firecracker-v').removesuffix('.yaml')} (fcvm-jailer-mock)\n")
        return 0
    args = _parser().parse_args(own)
    try:
        run(validate(args, extra, start_us, start_cpu_us))
    except JailerError as exc:
        print(f"jailer: error: {exc}", file=sys.stderr)
        return 1
    return 1  # unreachable: run() either execs or raises


if __name__ == "__main__":
    sys.exit(main())
