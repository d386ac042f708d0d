"""Boot to healthy: `fcvm podman run -d localhost/fcvm-demo-httpd` per hypervisor, cold then warm, with the
host-side time to InstanceStart (Firecracker path, also under the jailer). Anchor: a bare QEMU boot of the same
kernel, initramfs and rootfs that powers off as soon as userspace runs, measured in the same run.

Run (root, after scripts/setup-host.sh): python3 bench/boot.py [--runs 3]
Firecracker here is fc-mock (the official API, booting through QEMU TCG).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fcvm.core import paths
from fcvm.guest import find_kernel, find_rootfs, qemu_boot_args

SPEC = Path(__file__).resolve().parents[2] / "shared" / "firecracker" / "firecracker-v1.16.1.yaml"


def fcvm(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "fcvm", *args], capture_output=True, text=True, env=env,
                            check=False)
    if result.returncode != 0:
        raise SystemExit(f"fcvm {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def drop_caches() -> None:
    shutil.rmtree(paths.assets_dir() / "images", ignore_errors=True)  # the exported image disks
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def anchor_boot() -> float:
    kernel = find_kernel(refresh_initramfs=True)
    rootfs = find_rootfs()
    assert kernel is not None and rootfs is not None, "run scripts/setup-host.sh first"
    with tempfile.TemporaryDirectory(dir=paths.data_dir()) as scratch:
        disk = Path(scratch) / "disk.ext4"
        subprocess.run(["cp", "--reflink=auto", rootfs, disk], check=True)
        argv = ["qemu-system-x86_64", "-accel", "tcg,thread=single", "-cpu", "max", "-M", "microvm", "-m", "1024",
                "-smp", "2", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
                "-kernel", str(kernel.bzimage), "-initrd", str(kernel.initramfs),
                "-append", f"{qemu_boot_args()} fcvm_init=poweroff",
                "-drive", f"id=d0,file={disk},format=raw,if=none", "-device", "virtio-blk-device,drive=d0"]
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=False)
        return time.perf_counter() - start


def one_run(name: str, hypervisor: str, env: dict[str, str], extra: tuple[str, ...] = ()) -> dict[str, float]:
    start = time.perf_counter()
    fcvm("podman", "run", "-d", "--name", name, "--hypervisor", hypervisor, *extra, "localhost/fcvm-demo-httpd",
         env=env)
    wall = time.perf_counter() - start
    timings = json.loads(fcvm("inspect", name))[0]["config"]["timings"]
    fcvm("rm", "-f", name)
    return {**timings, "wall_to_healthy": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    anchor = statistics.median(anchor_boot() for _ in range(args.runs))
    print(f"anchor: bare QEMU boot to userspace and power-off  {anchor:6.2f} s")
    scripts = Path(sys.executable).parent
    mock = {**os.environ, "FCVM_FIRECRACKER_BIN": str(scripts / "fcvm-fc-mock"), "FCVM_FC_SPEC": str(SPEC)}
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as scratch:
        # The jailer runs only a binary named firecracker: a copy of fc-mock, jailed by the stand-in jailer.
        jailed_bin = Path(scratch) / "firecracker"
        shutil.copy(scripts / "fcvm-fc-mock", jailed_bin)
        jailed = {**mock, "FCVM_FIRECRACKER_BIN": str(jailed_bin),
                  "FCVM_JAILER_BIN": str(scripts / "fcvm-jailer-mock")}
        configs = [("qemu", "qemu", dict(os.environ), ()), ("firecracker (fc-mock)", "firecracker", mock, ()),
                   ("firecracker (fc-mock) --jailer", "firecracker", jailed, ("--jailer",))]
        for label, hypervisor, env, extra in configs:
            report(label, hypervisor, env, extra, args.runs, anchor)


def report(label: str, hypervisor: str, env: dict[str, str], extra: tuple[str, ...], runs: int,
           anchor: float) -> None:
    drop_caches()
    slug = label.split()[0] + ("-jailed" if extra else "")
    cold = one_run(f"bench-{slug}-cold", hypervisor, env, extra)
    warm = [one_run(f"bench-{slug}-{i}", hypervisor, env, extra) for i in range(runs)]
    print(f"\n{label}:")
    for stage in ("vmm_started", "agent_connected", "container_running", "healthy", "wall_to_healthy"):
        warm_median = statistics.median(w[stage] for w in warm)
        print(f"  {stage:<18} cold {cold[stage]:6.2f} s   warm {warm_median:6.2f} s"
              f"   ({warm_median / anchor:4.2f}x anchor)")

if __name__ == "__main__":
    main()
