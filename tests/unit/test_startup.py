"""Start-up stays fast: the read commands import only what they use (bench/cli_latency.py has the figures)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fcvm
from fcvm.cli.parser import build_parser
from fcvm.cli.read_commands import READ_COMMANDS
from fcvm.core import proc

SOURCES = Path(fcvm.__file__).resolve().parents[1]
# Each costs `fcvm ls` milliseconds at every start, and none is needed to list VMs.
HEAVY = ("logging", "subprocess", "typing", "threading", "shlex", "dataclasses", "pathlib", "argparse", "shutil",
         "locale", "socket")


def _modules_after(*argv: str) -> set[str]:
    """The modules loaded by `fcvm ARGV` in a fresh interpreter without site (whose .pth files may import
    anything: on this machine one imports certifi, and with it typing)."""
    code = textwrap.dedent(
        f"""
        import contextlib, io, sys
        from fcvm.cli.main import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main({list(argv)!r}) == 0
        print(" ".join(sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(SOURCES)}, check=False)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.mark.parametrize("argv", [("ls",), ("ls", "-a", "--json"), ("ls", "--json", "--all")])
def test_ls_imports_nothing_heavy(argv: tuple[str, ...]) -> None:
    loaded = _modules_after(*argv)
    assert "fcvm.commands.ls" in loaded
    assert sorted(loaded & set(HEAVY)) == []


def test_spawn_default_stdin_is_subprocess_devnull() -> None:
    assert proc.DEVNULL == subprocess.DEVNULL


def test_a_command_built_alone_parses_like_the_whole_cli() -> None:
    def parsed(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, object]:
        return {key: value for key, value in vars(parser.parse_args(argv)).items() if key != "group_parser"}

    for argv in (["ls", "-a", "--json"], ["stop", "-t", "3", "a", "b"], ["podman", "run", "-d", "img", "ls", "-d"]):
        assert parsed(build_parser(argv[0]), argv) == parsed(build_parser(), argv)


@pytest.mark.parametrize("argv", [
    ["ls"], ["ls", "-a"], ["ls", "--all", "--json"], ["ls", "--json", "-a", "-a"],
    ["inspect", "web"], ["inspect", ""],
    ["logs", "web"], ["logs", "-f", "web"], ["logs", "web", "--console", "--follow"],
    ["logs", "--console", "web", "-f"],
])
def test_a_read_commands_plain_argv_parses_as_argparse_parses_it(argv: list[str]) -> None:
    plain = READ_COMMANDS[argv[0]].parse(argv[1:])
    assert plain is not None
    full = vars(build_parser().parse_args(argv))
    del full["group_parser"]
    assert vars(plain) == full


@pytest.mark.parametrize("argv", [
    ["ls", "--al"], ["ls", "-h"], ["ls", "extra"], ["ls", "--json=1"], ["ls", "-"], ["ls", "-aj"],
    ["inspect"], ["inspect", "a", "b"], ["inspect", "--", "web"], ["inspect", "-x"],
    ["logs", "web", "--fol"], ["logs", "-f"],
])
def test_every_other_argv_of_a_read_command_is_left_to_argparse(argv: list[str]) -> None:
    assert READ_COMMANDS[argv[0]].parse(argv[1:]) is None
