"""The VMM is not root: the QEMU of a bridged VM, and of each of its clones, runs as a uid of its own with no
capabilities and under seccomp, and the VM still serves its page, runs exec and reads its volume.

The guest is untrusted and QEMU parses its device I/O, so the attacker here is a process with QEMU's identity:
what it could open is what a VMM escape would gain."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from fcvm.core.wait import wait_until
from tests.vm.conftest import free_port
from tests.vm.support import PAGE, RunVm, Server, fcvm, page

IMAGE = "localhost/fcvm-demo-httpd"


def _vmm_pid(name: str) -> int:
    """The VM's VMM process, as journaled by fcvm."""
    document = json.loads(fcvm("inspect", name).stdout)[0]
    pid = next(int(r["pid"]) for r in document["resources"] if r["kind"] == "process")
    assert Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"), name
    return pid


def _assert_unprivileged(name: str, pid: int) -> int:
    """The uid of VM `name`'s VMM `pid`, once shown to be neither root nor able to become it."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    status = {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}
    uids, gids = set(status["Uid"].split()), set(status["Gid"].split())  # real, effective, saved, filesystem
    assert len(uids) == 1 and uids != {"0"}, (name, status["Uid"])
    assert len(gids) == 1 and gids != {"0"}, (name, status["Gid"])
    for capabilities in ("CapEff", "CapPrm", "CapBnd"):  # none held, none to regain
        assert int(status[capabilities], 16) == 0, (name, capabilities, status[capabilities])
    assert status["NoNewPrivs"] == "1", name
    assert status["Seccomp"] == "2", name  # a filter: QEMU's -sandbox
    return int(uids.pop())


def _readable_as(uid: int, path: Path) -> bool:
    """Can a process with a VMM's identity (its uid and gid, no groups, no capabilities) read `path`?"""
    probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                            "--bounding-set=-all", "--", "head", "-c", "1", str(path)],
                           capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


def test_a_bridged_vm_and_its_clones_run_qemu_unprivileged_and_still_work(
        run_vm: RunVm, tmp_path: Path, isolated_data_dir: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "note.txt").write_text("from the host\n")
    port = free_port()
    run_vm("-d", "--no-snapshot", "--name", "src", "-p", f"{port}:80", "--map", f"{site}:/data:ro", IMAGE)
    server: Server | None = None
    pids = {"src": _vmm_pid("src")}
    uids = {"src": _assert_unprivileged("src", pids["src"])}
    try:
        assert PAGE in page(port)
        assert fcvm("exec", "src", "--", "cat", "/data/note.txt").stdout == "from the host\n"

        assert fcvm("snapshot", "create", "src", "--tag", "src-v1").stdout.strip() == "src-v1"
        server = Server("src-v1")
        clone_ports = {"f1": free_port(), "u1": free_port()}
        fcvm("snapshot", "run", "--snapshot", "src-v1", "--name", "f1", "-p", f"{clone_ports['f1']}:80", "-d")
        fcvm("snapshot", "run", "--pid", str(server.pid), "--name", "u1", "-p", f"{clone_ports['u1']}:80", "-d")
        for name, clone_port in clone_ports.items():
            pids[name] = _vmm_pid(name)
            uids[name] = _assert_unprivileged(name, pids[name])
            assert PAGE in page(clone_port), name
            assert fcvm("exec", name, "--", "cat", "/data/note.txt").stdout == "from the host\n", name
        assert len(set(uids.values())) == 3, uids  # no two VMMs share an identity

        # What an escaped VMM could read: not the host's secrets, not the snapshot's memory (a File clone's QEMU
        # was lent it only until it had it open), not another VM's RAM or disk.
        snapshot_memory = isolated_data_dir / "snapshots" / "src-v1" / "memory"
        source_dir = Path(json.loads(fcvm("inspect", "src").stdout)[0]["dir"])
        for name, uid in uids.items():
            for secret in (Path("/etc/shadow"), snapshot_memory, source_dir / "mem", source_dir / "rootfs.ext4"):
                assert not _readable_as(uid, secret), (name, secret)
        assert snapshot_memory.stat().st_mode & 0o777 == 0o600
        assert "system.posix_acl_access" not in os.listxattr(snapshot_memory)
    finally:
        if server is not None:
            server.stop()
        for name in ("u1", "f1", "src"):
            fcvm("stop", name, check=False)
    # No VMM outlives its VM.
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids.values()), 30), pids
