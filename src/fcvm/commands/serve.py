"""`fcvm serve [--listen HOST:PORT]`: a sandbox API that the official E2B SDKs drive unchanged; templates are
snapshots (cloned) or local images (booted), sandboxes are microVMs. Runs until SIGINT/SIGTERM, then kills every
sandbox it started."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import re
import secrets
import signal
import sys

from fcvm.core import log
from fcvm.core.errors import UsageError

API_KEY_ENV = "FCVM_API_KEY"
_E2B_KEY = re.compile(r"e2b_[0-9a-f]+")  # what the SDKs (Python >= 2.25, JS >= 2.27) accept without opting out

_log = log.get("serve")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not (port.isdigit() and 0 < int(port) < 65536) or not host:
        raise UsageError(f"--listen {value!r} must be HOST:PORT, e.g. 127.0.0.1:3000")
    return host, int(port)


def _url_host(host: str) -> str:
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    return host


async def _serve(args: argparse.Namespace, host: str, port: int, api_key: str, key_shown: str) -> None:
    from aiohttp import web

    from fcvm.serve.app import Server
    from fcvm.serve.sandboxes import Sandboxes
    from fcvm.serve.vm import VmBackend

    sandboxes = Sandboxes(VmBackend(boot_timeout=args.boot_timeout), default_template=args.default_template,
                          pool=args.pool)
    runner = web.AppRunner(Server(sandboxes, api_key).app(), access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        url = f"http://{_url_host(host)}:{port}"
        print(f"export E2B_API_URL={url} E2B_SANDBOX_URL={url} E2B_API_KEY={key_shown}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        print("stopping: killing the sandboxes", file=sys.stderr, flush=True)
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    if args.pool < 0:
        raise UsageError("--pool must be 0 or more")
    api_key = os.environ.get(API_KEY_ENV, "")
    if api_key:
        key_shown = f"${API_KEY_ENV}"  # a key the user chose is a secret: never echoed
        if not _E2B_KEY.fullmatch(api_key):
            _log.warning("%s is not e2b_ and hex digits: the SDKs refuse such a key unless "
                         "E2B_VALIDATE_API_KEY=false", API_KEY_ENV)
    else:
        api_key = key_shown = f"e2b_{secrets.token_hex(20)}"
    if not _is_loopback(host):
        _log.warning("serving plain HTTP on %s: anyone who can reach it and knows the key controls the sandboxes",
                     host)
    asyncio.run(_serve(args, host, port, api_key, key_shown))
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
