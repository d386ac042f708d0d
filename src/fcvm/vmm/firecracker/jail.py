"""Running Firecracker under its jailer: the jail's layout, the jailer's command line, paths inside the jail.

The jailer (Firecracker's `jailer` binary, same version) creates `<base>/<exec file name>/<id>/root`,
copies the Firecracker binary there (its name must contain "firecracker"), joins the VM's network
namespace, pivots into the root, drops to `uid:gid` and execs Firecracker with `--id <id>`: the same pid,
so fcvm's process tracking and output capture do not change.

Cgroup: with cgroup v2 and no `--cgroup` settings, the jailer creates no cgroup of its own; it only joins
`<cgroup2 mount>/<parent cgroup>` when that exists. So fcvm creates `fcvm/<id>` itself and passes it as the
parent: each VMM gets a cgroup of its own, which fcvm removes with the VM.

Inside the jail Firecracker sees only what fcvm put into the root before launch: the kernel and initrd
(hard links of the shared, world-readable assets), the VM's own disks (owned by the jail uid), the vsock
socket and its `_<port>` listeners (owned by the jail uid, so Firecracker may connect to them). Every
path fcvm sends to the API is therefore the host path made relative to the root, which `inside()`
computes and checks: a path outside the jail is a bug that would only show up as a 400 at boot.

Each VM gets its own uid (and gid) from a range no login or subordinate-id range uses, so two jailed
VMMs never share an identity.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from fcvm.core.errors import FcvmError

JAILER_ENV = "FCVM_JAILER_BIN"
PARENT_CGROUP = "fcvm"
API_SOCKET = "/run/firecracker.socket"  # Firecracker's default, inside the jail
# Subordinate id ranges (/etc/subuid) start at 100000 and grow by 65536 per user; login uids are small.
JAIL_UID_BASE = 1_900_000_000
JAIL_UID_COUNT = 65536


def find_jailer(explicit: str | None, firecracker: Path) -> Path:
    """`--jailer-bin`, else `$FCVM_JAILER_BIN`, else `jailer` beside the Firecracker binary (how
    `fcvm setup firecracker` installs the release), else `jailer` on PATH."""
    for value, source in ((explicit, "--jailer-bin"), (os.environ.get(JAILER_ENV), JAILER_ENV)):
        if value:
            found = shutil.which(value) if os.sep not in value else value
            if found is None or not os.access(found, os.X_OK) or not Path(found).is_file():
                raise FcvmError(f"jailer {value!r} (from {source}) does not exist or is not executable")
            return Path(found).resolve()
    beside = firecracker.parent / "jailer"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    on_path = shutil.which("jailer")
    if on_path:
        return Path(on_path).resolve()
    raise FcvmError("--jailer: no jailer binary found",
                    hint=f"install the Firecracker release with `fcvm setup firecracker`, or set {JAILER_ENV}")


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
            return Path(fields[0].split()[4])
    return None


@dataclass(frozen=True)
class Jail:
    jailer: Path
    exec_file: Path  # the Firecracker binary the jailer copies in and execs; its name contains "firecracker"
    id: str  # [A-Za-z0-9-]{1,64}; also Firecracker's instance id
    uid: int
    gid: int
    base: Path  # --chroot-base-dir
    netns: Path | None  # e.g. /run/netns/fcvm-<id>

    @property
    def dir(self) -> Path:
        return self.base / self.exec_file.name / self.id

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def api_socket(self) -> Path:
        """The API socket as the host sees it."""
        return self.root / API_SOCKET.lstrip("/")

    def cgroup_dir(self) -> Path | None:
        mount = cgroup2_mount()
        return mount / PARENT_CGROUP / self.id if mount else None

    def inside(self, path: Path) -> str:
        """`path` (a host path under the root) as Firecracker sees it."""
        try:
            relative = Path(path).relative_to(self.root)
        except ValueError:
            raise FcvmError(f"{path} is outside the jail {self.root}: the jailed Firecracker cannot open it") from None
        return f"/{relative}"

    def create(self) -> None:
        """The VMM's cgroup; the root and its /run, owned by the jail uid (Firecracker binds its sockets there)."""
        cgroup = self.cgroup_dir()
        if cgroup is None:
            raise FcvmError("--jailer needs a cgroup v2 hierarchy, and none is mounted")
        cgroup.mkdir(parents=True, exist_ok=True)
        for directory in (self.root, self.api_socket.parent):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(directory, self.uid, self.gid)

    def admit(self, path: Path, *, writable: bool = False) -> Path:
        """`path` made visible in the jail: a hard link (the jail is on the data dir's filesystem). The VM's own
        writable disk is given to the jail uid; a shared asset the jail uid could not read is copied, never
        re-owned, so other VMs keep theirs."""
        from fcvm.storage.btrfs import clone_file

        target = self.root / path.name
        private = writable or not path.stat().st_mode & stat.S_IROTH
        if private and not writable:
            clone_file(path, target)
        else:
            try:
                os.link(path, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                clone_file(path, target)
        if private:
            os.chown(target, self.uid, self.gid)
        return target

    def argv(self, firecracker_args: list[str]) -> list[str]:
        argv = [
            str(self.jailer),
            "--id", self.id,
            "--exec-file", str(self.exec_file),
            "--uid", str(self.uid),
            "--gid", str(self.gid),
            "--chroot-base-dir", str(self.base),
            "--cgroup-version", "2",
            "--parent-cgroup", f"{PARENT_CGROUP}/{self.id}",
        ]
        if self.netns is not None:
            argv += ["--netns", str(self.netns)]
        return [*argv, "--", *firecracker_args]
