"""`fcvm-fc-mock`: a stand-in for the `firecracker` executable that boots guests with QEMU.

It takes Firecracker's command line, serves Firecracker's REST API on `--api-sock` (validated
against the official spec: `--spec PATH`, `$FCVM_FC_SPEC`, or `../shared/firecracker/` found
beside the checkout or the current directory), and on InstanceStart boots the configured kernel,
initrd, drives, TAP and vsock for real with `fcvm.vmm.qemu.QemuVm` (see backend.py).

Output, as Firecracker's: the guest serial console and the log (`[<id>:<thread>]`-prefixed,
timestamped lines) on stdout, the log to `--log-path` / PUT /logger `log_path` when given.

How to tell it is not Firecracker (it never pretends otherwise):
- every API response carries the header `X-Fcvm-Mock: 1`;
- `--version` prints `Firecracker v1.16.1 (fc-mock)`;
- `GET /` still answers `app_name: "Firecracker"` (clients parse it), so use the two above.

Lifecycle: exits 0 when the guest powers off (e.g. after SendCtrlAltDel), and on SIGTERM/SIGINT
stops the guest at once; it removes its API socket and private working directory on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from fcvm.core import log
from fcvm.core.errors import FcvmError
from fcvm_standins.fc_mock import caps
from fcvm_standins.fc_mock.api import MAX_PAYLOAD, FcMock
from fcvm_standins.fc_mock.backend import default_factory
from fcvm_standins.fc_mock.mmds import GuestMmds
from fcvm_standins.fc_mock.server import ApiServer
from fcvm_standins.fc_mock.spec import SPEC_NAME, Spec, find_spec

_log = log.get("fc_mock")
DEFAULT_API_SOCK = "/run/firecracker.socket"
_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "warn": logging.WARNING,
           "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG, "off": logging.CRITICAL + 10}


class FirecrackerFormatter(logging.Formatter):
    """`2026-11-26T18:00:00.123456789 [id:thread] message`, as Firecracker writes its log."""

    def __init__(self, instance_id: str, show_level: bool = False, show_origin: bool = False) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.show_level = show_level
        self.show_origin = show_origin

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000"
        thread = "main" if record.threadName == "MainThread" else "fc_api"
        tags = [self.instance_id, thread]
        if self.show_level:
            tags.append(record.levelname)
        if self.show_origin:
            tags += [record.pathname, str(record.lineno)]
        return f"{stamp} [{':'.join(tags)}] {record.getMessage()}"


class _Console(logging.Handler):
    """The guest serial console (`fcvm.vm.*` records from the backend): raw lines on stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(record.getMessage() + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


class Logs:
    def __init__(self, instance_id: str, level: str, path: str | None) -> None:
        self.instance_id = instance_id
        self.handler: logging.Handler = self._handler(path)
        self.handler.setFormatter(FirecrackerFormatter(instance_id))
        self.root = logging.getLogger("fcvm")
        self.root.handlers[:] = [self.handler]
        self.root.propagate = False
        self.set_level(level)
        console = logging.getLogger("fcvm.vm")
        console.handlers[:] = [_Console()]
        console.setLevel(logging.DEBUG)
        console.propagate = False

    @staticmethod
    def _handler(path: str | None) -> logging.Handler:
        if path:
            return logging.StreamHandler(open(path, "a", buffering=1))
        return logging.StreamHandler(sys.stdout)

    def set_level(self, level: str) -> None:
        numeric = _LEVELS.get(level.lower())
        if numeric is None:
            raise FcvmError(f"invalid log level {level!r}: use Error, Warning, Info, Debug, Trace or Off")
        self.root.setLevel(numeric)

    def configure(self, body: dict[str, Any]) -> None:
        """PUT /logger."""
        if body.get("log_path"):
            handler = self._handler(body["log_path"])
            self.root.handlers[:] = [handler]
            self.handler = handler
        self.handler.setFormatter(FirecrackerFormatter(
            self.instance_id, bool(body.get("show_level")), bool(body.get("show_log_origin"))))
        if body.get("level"):
            self.set_level(body["level"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fcvm-fc-mock", description=__doc__.splitlines()[0])
    p.add_argument("--api-sock", default=DEFAULT_API_SOCK, help="path of the API Unix socket")
    p.add_argument("--id", default="anonymous-instance", help="microVM id")
    p.add_argument("--config-file", help="JSON configuration: boot the microVM without API calls")
    p.add_argument("--no-api", action="store_true", help="no API socket (needs --config-file)")
    p.add_argument("--level", default="Info", help="log level")
    p.add_argument("--log-path", help="log file or named pipe")
    p.add_argument("--show-level", action="store_true")
    p.add_argument("--show-log-origin", action="store_true")
    p.add_argument("--module", help="log module filter (ignored)")
    p.add_argument("--metadata", help="JSON file loaded into the MMDS data store")
    p.add_argument("--mmds-size-limit", type=int, help="MMDS data store limit in bytes")
    p.add_argument("--http-api-max-payload-size", type=int, default=MAX_PAYLOAD)
    p.add_argument("--boot-timer", action="store_true", help="accepted and ignored")
    p.add_argument("--start-time-us", type=int, help="accepted and ignored")
    p.add_argument("--start-time-cpu-us", type=int, help="accepted and ignored")
    p.add_argument("--parent-cpu-time-us", type=int, help="accepted and ignored")
    p.add_argument("--seccomp-filter", help="accepted and ignored")
    p.add_argument("--no-seccomp", action="store_true", help="accepted and ignored")
    p.add_argument("--enable-pci", action="store_true", help="do not append pci=off")
    p.add_argument("--metrics-path", help="metrics file")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--spec", help=f"the official Firecracker API spec ({SPEC_NAME})")
    return p.parse_args(argv)


_CONFIG_ORDER = [
    ("logger", "/logger"), ("metrics", "/metrics"), ("boot-source", "/boot-source"),
    ("machine-config", "/machine-config"), ("cpu-config", "/cpu-config"), ("drives", "/drives/{drive_id}"),
    ("pmem", "/pmem/{id}"), ("network-interfaces", "/network-interfaces/{iface_id}"), ("vsock", "/vsock"),
    ("mmds-config", "/mmds/config"), ("balloon", "/balloon"), ("entropy", "/entropy"),
    ("memory-hotplug", "/hotplug/memory"), ("serial", "/serial"),
]


def apply_config_file(api: FcMock, path: str) -> None:
    """Firecracker's --config-file: each section as its PUT, then InstanceStart."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise FcvmError(f"cannot read --config-file {path}: {exc}") from None
    if not isinstance(config, dict):
        raise FcvmError(f"--config-file {path} must hold a JSON object")
    known = {key for key, _ in _CONFIG_ORDER}
    unknown = sorted(set(config) - known)
    if unknown:
        raise FcvmError(f"--config-file {path}: unknown field(s) {', '.join(unknown)}")
    for key, template in _CONFIG_ORDER:
        if key not in config:
            continue
        items = config[key] if isinstance(config[key], list) else [config[key]]
        for item in items:
            url = template.format(**item) if "{" in template and isinstance(item, dict) else template
            response = api.handle("PUT", url, json.dumps(item).encode())
            if response.status >= 400:
                raise FcvmError(f"--config-file {key}: {response.body['fault_message']}")
    response = api.handle("PUT", "/actions", b'{"action_type": "InstanceStart"}')
    if response.status >= 400:
        raise FcvmError(f"--config-file: {response.body['fault_message']}")


def _version_text(explicit: str | None) -> str:
    try:
        return Spec(find_spec(explicit)).version
    except FcvmError:
        return SPEC_NAME.removeprefix("firecracker-v").removesuffix(".yaml")


def main(argv: Sequence[str] | None = None) -> int:
    # Jailed (fcvm-jailer-mock), fc-mock holds CAP_NET_ADMIN and CAP_NET_BIND_SERVICE as ambient capabilities
    # for its host-side MMDS. It keeps them; QEMU, which it spawns, must get none (see caps.py).
    caps.clear_ambient()
    args = parse_args(argv)
    if args.version:
        print(f"Firecracker v{_version_text(args.spec)} (fc-mock)\n")
        return 0
    try:
        return _run(args)
    except FcvmError as exc:
        print(f"fc-mock: error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    spec = Spec(find_spec(args.spec))
    logs = Logs(args.id, args.level, args.log_path)
    if args.show_level or args.show_log_origin:
        logs.handler.setFormatter(FirecrackerFormatter(args.id, args.show_level, args.show_log_origin))
    if args.no_api and not args.config_file:
        raise FcvmError("--no-api needs --config-file")
    api_sock = Path(args.api_sock)
    workdir = api_sock.parent / f"fc-mock-{args.id}"  # QEMU's private files; removed on exit
    exit_code: list[int] = []
    done = threading.Event()
    server: ApiServer | None = None

    def on_exit(code: int) -> None:
        exit_code.append(code)
        done.set()
        if server is not None:
            server.stop_soon()

    api = FcMock(
        spec,
        instance_id=args.id,
        workdir=workdir,
        backend_factory=default_factory(),
        max_payload=args.http_api_max_payload_size,
        mmds_size_limit=args.mmds_size_limit,
        on_exit=on_exit,
        guest_mmds=GuestMmds,
        on_logger=logs.configure,
        enable_pci=args.enable_pci,
    )

    def on_signal(signum: int, _frame: object) -> None:
        _log.info("caught signal %d, stopping", signum)
        threading.Thread(target=api.shutdown, args=(128 + signum,), kwargs={"force": True},
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _log.info("Running Firecracker v%s (fc-mock: the Firecracker API on QEMU)", spec.version)

    if args.metrics_path:
        response = api.handle("PUT", "/metrics", json.dumps({"metrics_path": args.metrics_path}).encode())
        if response.status >= 400:
            raise FcvmError(f"--metrics-path: {response.body['fault_message']}")
    if args.metadata:
        response = api.handle("PUT", "/mmds", Path(args.metadata).read_bytes())
        if response.status >= 400:
            raise FcvmError(f"--metadata: {response.body['fault_message']}")
    try:
        if not args.no_api:
            if api_sock.exists() or api_sock.is_symlink():
                raise FcvmError(f"Failed to open the API socket at {api_sock}: Address in use "
                                "(the path exists; remove the stale socket first)")
            try:
                server = ApiServer(str(api_sock), api)
            except OSError as exc:
                raise FcvmError(f"Failed to open the API socket at {api_sock}: {exc}") from None
            _log.info("API server listening on %s", api_sock)
        if args.config_file:
            apply_config_file(api, args.config_file)
        if server is not None:
            server.serve_forever(poll_interval=0.2)
        done.wait()
    finally:
        api.shutdown(0)
        if server is not None:
            server.server_close()
            with contextlib.suppress(FileNotFoundError):
                api_sock.unlink()
        shutil.rmtree(workdir, ignore_errors=True)
        _flush(sys.stdout)
    return exit_code[0] if exit_code else 0


def _flush(stream: IO[str]) -> None:
    with contextlib.suppress(OSError, ValueError):
        stream.flush()


if __name__ == "__main__":
    sys.exit(main())
