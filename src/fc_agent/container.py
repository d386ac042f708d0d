"""The container: load its image from the read-only image disk, run it with podman, stream its output."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from fc_agent import conmon, seccomp, system
from fcvm_wire.control import LogStream
from fcvm_wire.plan import Plan

CONTAINER = "fcvm"
_CHUNK = 1 << 20
_EXIT_CODE = re.compile(r"[0-9]{1,3}")
_started_id: list[str] = []  # the id podman gave the container: crun knows it by that, not by name


class ContainerError(RuntimeError):
    pass


def load_image(plan: Plan) -> None:
    """Stream `archive_size` bytes of the image disk into `podman load`."""
    if not plan.image.disk:
        return
    # podman's output is a few lines; stderr is read after the archive is written, so it cannot fill up.
    loader = system.spawn(["podman", "load"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert loader.stdin is not None
    remaining = plan.image.archive_size
    try:
        with open(plan.image.disk, "rb") as disk:
            while remaining > 0:
                chunk = disk.read(min(_CHUNK, remaining))
                if not chunk:
                    raise ContainerError(f"image disk {plan.image.disk} ended {remaining} bytes early")
                loader.stdin.write(chunk)
                remaining -= len(chunk)
        loader.stdin.close()
        assert loader.stderr is not None
        stderr = loader.stderr.read()
        loader.wait()
    finally:
        system.forget(loader)
    if loader.returncode != 0:
        raise ContainerError(f"podman load failed: {stderr.decode(errors='replace').strip()}")


def run_argv(plan: Plan, volume_mounts: list[tuple[str, str, bool]], seccomp_profile: Path) -> list[str]:
    # The profile keeps the container from creating AF_VSOCK sockets: the channel to the host is the agent's.
    argv = ["podman", "run", "-d", "--name", CONTAINER, "--network", "host", "--replace",
            "--security-opt", f"seccomp={seccomp_profile}"]
    if plan.hostname:
        argv += ["--hostname", plan.hostname]
    for key, value in plan.env.items():
        argv += ["--env", f"{key}={value}"]
    if plan.user:
        argv += ["--user", plan.user]
    if plan.workdir:
        argv += ["--workdir", plan.workdir]
    for source, target, read_only in volume_mounts:
        argv += ["--volume", f"{source}:{target}{':ro' if read_only else ''}"]
    return [*argv, plan.image.ref, *plan.cmd]


def start(plan: Plan, volume_mounts: list[tuple[str, str, bool]]) -> None:
    argv = run_argv(plan, volume_mounts, seccomp.write_profile())
    result = system.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        raise ContainerError(f"podman run failed: {result.stderr.decode(errors='replace').strip()}")
    _started_id[:] = result.stdout.decode(errors="replace").split()[-1:]


def started_id() -> str | None:
    return _started_id[0] if _started_id else None


def follow_logs(emit: Callable[[LogStream, str], None], ended: threading.Event) -> threading.Thread:
    """Follow the container's stdout and stderr from its start (conmon.follow_log) until `ended` is set."""
    container_id = started_id()
    assert container_id is not None, "the container has not started"
    follower = threading.Thread(target=conmon.follow_log, args=(container_id, emit, ended), daemon=True,
                                name="container-log")
    follower.start()
    return follower


def wait() -> int:
    """The container's exit code, once it has exited: from conmon's exit file, else from `podman wait`."""
    container_id = started_id()
    if container_id is not None and (code := conmon.wait_for_exit(container_id)) is not None:
        return code
    result = system.run(["podman", "wait", CONTAINER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode != 0:
        raise ContainerError(f"podman wait failed: {result.stderr.decode(errors='replace').strip()}")
    words = result.stdout.decode(errors="replace").split()
    if not words or not _EXIT_CODE.fullmatch(words[-1]) or int(words[-1]) > 255:
        raise ContainerError(f"podman wait printed no exit code 0..255: {' '.join(words[-1:])[:40]!r}")
    return int(words[-1])


def stop(timeout: int) -> None:
    system.run(["podman", "stop", "--time", str(timeout), CONTAINER], stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)


def image_has_healthcheck(image_ref: str) -> bool | None:
    """Whether the image defines a HEALTHCHECK; None while podman does not have the image (it pulls at the run).
    Asked once the image is loaded, before the run's plan: a pre-start snapshot keeps the answer, so a warm
    start runs no podman for it while its container starts."""
    result = system.run(
        ["podman", "image", "inspect", "--format", "{{json .HealthCheck}}", image_ref],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    if result.returncode != 0:
        return None
    text = result.stdout.decode().strip()
    return text not in ("", "null") and bool(json.loads(text).get("Test"))


def healthcheck() -> bool:
    return system.run(["podman", "healthcheck", "run", CONTAINER], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode == 0
