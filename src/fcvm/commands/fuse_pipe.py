"""`fcvm fuse-pipe serve | mount | mount-local`: the fuse-pipe ends as standalone commands."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType

from fcvm.core import log, paths
from fcvm.core.errors import FcvmError
from fcvm_wire.fusepipe import RelayGiveUp
from fcvm_wire.fusepipe.client import Relay, unix_connect, vsock_connect

_log = log.get("fusepipe")
PR_SET_PDEATHSIG = 1


def _check_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FcvmError(f"{what} {path} is not a directory", hint="create it first")
    return os.path.abspath(path)


def _need_root() -> None:
    if os.geteuid() != 0:
        raise FcvmError("mounting a FUSE filesystem with allow_other needs root", hint="run with sudo")
    if not os.path.exists("/dev/fuse"):
        raise FcvmError("/dev/fuse is missing", hint="modprobe fuse")


def serve(args: argparse.Namespace) -> int:
    from fcvm.fusepipe.server import Server

    root = _check_dir(args.dir, "served directory")
    path = args.socket
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    paths.bind_private(listener, path)  # a client acts on the served directory: its owner's alone
    listener.listen(16)
    server = Server(root, read_only=args.ro)

    def stop(signum: int, frame: FrameType | None) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _log.info("serving %s on %s%s", root, path, " (read-only)" if args.ro else "")
    try:
        server.serve_forever(listener)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server.close()
    return 0


def _run_relay(connect: Callable[[], socket.socket], mountpoint: str, readers: int, read_only: bool) -> int:
    """Run the relay in a thread; SIGINT/SIGTERM unmount it cleanly."""
    r = Relay(connect, mountpoint, readers=readers, read_only=read_only)
    thread = threading.Thread(target=lambda: _swallow(r.run), name="fp-relay", daemon=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        r.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    thread.start()
    r.mounted.wait()
    if r.error is not None:
        raise FcvmError(f"fuse-pipe mount at {mountpoint} failed: {r.error}")
    _log.info("mounted at %s", mountpoint)
    while not r.finished.wait(0.5):
        pass
    thread.join(5)
    return 0


def _swallow(fn: Callable[[], None]) -> None:
    with contextlib.suppress(BaseException):
        fn()


def mount(args: argparse.Namespace) -> int:
    _need_root()
    mountpoint = _check_dir(args.mountpoint, "mount point")
    if bool(args.socket) == (args.vsock_port is not None):
        raise FcvmError("give exactly one of --socket PATH or --vsock-port N")
    connect = unix_connect(args.socket) if args.socket else vsock_connect(args.vsock_port)
    return _run_relay(connect, mountpoint, args.readers, False)


def mount_local(args: argparse.Namespace) -> int:
    """Serve DIR in a child process and mount it at MOUNTPOINT over a socket pair."""
    _need_root()
    root = _check_dir(args.dir, "served directory")
    mountpoint = _check_dir(args.mountpoint, "mount point")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the server: exits when the stream closes (the relay unmounted) or the parent dies
        code = 0
        try:
            ours.close()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() == 1:
                os._exit(0)
            from fcvm.fusepipe.server import serve as serve_dir

            serve_dir(root, theirs, read_only=args.ro)
        except BaseException:
            _log.exception("fuse-pipe server failed")
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    theirs.close()
    used = [False]

    def connect() -> socket.socket:
        if used[0]:
            raise RelayGiveUp("the local server is gone")
        used[0] = True
        return ours

    try:
        return _run_relay(connect, mountpoint, args.readers, args.ro)
    finally:
        ours.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
