from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fcvm.cli.main import _load
from fcvm.cli.parser import build_parser, parse


def fcvm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fcvm", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_every_command_group() -> None:
    result = fcvm("--help")
    assert result.returncode == 0
    for group in ("podman", "ls", "inspect", "logs", "exec", "stop", "rm", "snapshot", "setup", "doctor",
                  "gc", "fuse-pipe"):
        assert f"    {group}" in result.stdout, group
    snapshot = fcvm("snapshot", "--help").stdout
    for command in ("create", "serve", "run", "ls", "rm", "prune"):
        assert command in snapshot
    assert "mount-local" in fcvm("fuse-pipe", "--help").stdout


def test_a_group_without_a_command_prints_its_help_and_exits_2() -> None:
    result = fcvm("snapshot")
    assert result.returncode == 2
    assert "create" in result.stderr


def _handlers(parser: argparse.ArgumentParser) -> list[str]:
    found = [parser.get_default("handler")]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _handlers(child)
    return [h for h in found if h]


def test_every_advertised_command_is_built() -> None:
    handlers = _handlers(build_parser())
    assert "snapshot_run:run" in handlers and "snapshot_prune:run" in handlers
    for target in handlers:
        assert callable(_load(*target.split(":"))), target


@pytest.mark.parametrize(("argv", "env"), [(["--log-level", "chatty", "ls"], {}), (["ls"], {"FCVM_LOG": "chatty"})])
def test_unknown_log_level_is_a_usage_error(argv: list[str], env: dict[str, str]) -> None:
    result = fcvm(*argv, env=env)
    assert result.returncode == 2
    assert result.stderr == "Error: fcvm: unknown log level 'chatty': use debug, info, warning or error\n"


def test_ls_shows_a_live_row_and_reaps_it_after_sigkill(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import time
        from fcvm.core.proc import ProcessRef
        from fcvm.state import Store
        store = Store()
        vm = store.create_vm("held", process=ProcessRef.self(), image="localhost/web", hypervisor="qemu")
        store.update_vm(vm.id, status="running", health="healthy",
                        ports=[{"host_ip": "", "host_port": 8080, "guest_port": 80, "protocol": "tcp"}])
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert owner.stdout is not None and owner.stdout.readline() == b"ready\n"
    listing = fcvm("ls")
    assert listing.returncode == 0
    line = next(row for row in listing.stdout.splitlines() if " held " in row)
    assert "running" in line and "healthy" in line and "0.0.0.0:8080->80/tcp" in line and str(owner.pid) in line
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert " held " not in fcvm("ls").stdout
    rows = json.loads(fcvm("ls", "-a", "--json").stdout)
    assert [(r["name"], r["status"]) for r in rows] == [("held", "exited")]
    assert "exited (killed)" in fcvm("ls", "-a").stdout


def test_inspect_and_rm_of_unknown_vm_fail_clearly() -> None:
    result = fcvm("inspect", "ghost")
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: no VM named 'ghost' (see `fcvm ls -a`)"
    assert fcvm("rm", "ghost").returncode == 1


@pytest.mark.parametrize(
    ("argv", "vm", "interactive", "tty", "command"),
    [
        (["exec", "web", "--", "ls", "-l"], False, False, False, ["ls", "-l"]),
        (["exec", "--vm", "-i", "web", "--", "sh"], True, True, False, ["sh"]),
        (["exec", "web", "--vm", "-it", "--", "sh", "-c", "echo --vm"], True, True, True, ["sh", "-c", "echo --vm"]),
        (["exec", "web", "cat", "-t"], False, False, False, ["cat", "-t"]),
    ],
)
def test_exec_flags_may_come_before_or_after_the_name(
    argv: list[str], vm: bool, interactive: bool, tty: bool, command: list[str]
) -> None:
    args = parse(argv)
    assert (args.vm, args.interactive, args.tty, args.command) == (vm, interactive, tty, command)
